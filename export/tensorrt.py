"""`llama3-deploy build-engine`: a portable (or calibrated Q/DQ) export -> a TensorRT engine directory.

    export dir --(checks: flavor, files, limits, output, GPU capability, Q/DQ readiness)--> strongly typed
    network (OnnxParser.parse_from_file, so model.onnx.data resolves beside the graph) -> builder config
    (prefill + decode profiles from the I/O contract, workspace limit, timing cache) -> serialized engine
    -> ENGINE_DIR: model.engine, engine.json, and the export's manifest, configs and tokenizer files.

The output is written to a temporary sibling directory and renamed into place when complete (fsutil's
atomic_directory, as exports are), so a failed build leaves nothing behind. The timing cache file, when given,
seeds the build and is written back (temp file + os.replace) so later builds of any model reuse its timings.
TensorRT and cuda-python are imported inside `build_engine` (the tensorrt extra); nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

from llama3_deploy import contract, engine as eng
from llama3_deploy.config import human_bytes, read_json
from llama3_deploy.errors import DeployError
from llama3_deploy.fsutil import atomic_directory, atomic_write_bytes, check_output_dir, contained_file
from llama3_deploy.manifest import MANIFEST_FILE, load_manifest

DEFAULT_MAX_CONTEXT = 4096   # capped at the model's context; activation memory grows with it
DEFAULT_PREFILL_CHUNK = 512  # the runtime's default prefill chunk (runtime/generate.py)
DEFAULT_WORKSPACE_GIB = 4.0


def _load():
    from llama3_deploy.runtime.tensorrt import load_libraries  # its DeployError names the extra
    return load_libraries()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[build-engine] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class EngineResult:
    output: Path
    manifest: eng.EngineManifest

    def summary(self) -> str:
        m, lim, p = self.manifest, self.manifest.limits, self.manifest.precision
        quant = f", {p['qdq_format']} Q/DQ" if p.get("qdq_format") else ""
        return "\n".join([
            f"built {self.output / eng.ENGINE_FILE} ({human_bytes(m.engine_bytes)}) with TensorRT "
            f"{m.tensorrt_version} for {m.gpu_name} (compute capability {m.compute_capability[0]}."
            f"{m.compute_capability[1]})",
            f"  weights {p['weight_dtype']}{quant}, KV cache {p['kv_dtype']}; up to {lim.max_batch} rows, "
            f"{lim.max_context} tokens of context, {lim.prefill_chunk}-token prefill chunks",
            f"  build {m.build.get('build_s', 0):.1f} s; run it with: llama3-deploy generate --model {self.output} "
            "--backend tensorrt --device cuda"])


def _open_export(model_dir: Path):
    """The export's manifest, after refusing what TensorRT cannot build."""
    if not model_dir.is_dir():
        raise DeployError(f"export directory not found: {model_dir}")
    raw = read_json(model_dir / MANIFEST_FILE, what="export manifest")
    if raw.get("flavor") == "optimized":
        raise DeployError(f"{model_dir} is an optimized-flavor export: its ONNX Runtime contrib ops "
                          "(GroupQueryAttention, fused norms, MatMulNBits) have no TensorRT importer. Export with "
                          "--flavor portable (or calibrate) to build an engine")
    for name in (contract.MODEL_FILE, contract.DATA_FILE, "config.json"):
        if not (model_dir / name).is_file():
            raise DeployError(f"export directory {model_dir} is missing {name}")
    return load_manifest(model_dir)


def _limits(config, max_batch, max_context, prefill_chunk) -> eng.Limits:
    if max_context is None:
        max_context = min(DEFAULT_MAX_CONTEXT, config.max_position_embeddings)
    if prefill_chunk is None and isinstance(max_context, int):
        prefill_chunk = min(DEFAULT_PREFILL_CHUNK, max_context)
    return eng.Limits(max_batch, max_context, prefill_chunk).check(config)


def _workspace_bytes(workspace_gib) -> int:
    if isinstance(workspace_gib, bool) or not isinstance(workspace_gib, (int, float)) \
            or not math.isfinite(workspace_gib) or workspace_gib <= 0:
        raise DeployError(f"workspace_gib must be a positive number of GiB (got {workspace_gib!r})")
    return int(workspace_gib * (1 << 30))


def _network_flags(trt) -> int:
    """Strongly typed: each tensor keeps the graph's type (Q/DQ and the fp16/bf16 weights decide precision)."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0  # TensorRT 11 networks are always strongly typed
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise DeployError(f"TensorRT {trt.__version__} cannot build strongly typed networks; install tensorrt>=10.1")
    return 1 << int(flag)


def _attr(obj, name: str):
    """obj.name() where the binding has it (older TensorRT lacks node_name/node_operator), else None."""
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else fn
    except Exception:  # noqa: BLE001 - a binding that cannot report one detail must not hide the others
        return None


def _parser_errors(parser, path: Path) -> DeployError:
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        name, op, node, code = (_attr(e, a) for a in ("node_name", "node_operator", "node", "code"))
        if name:
            where = f"node {name!r}" + (f" ({op})" if op else "")
        elif isinstance(node, int) and node >= 0:
            where = f"node #{node}" + (f" ({op})" if op else "")
        else:
            where = "the graph"
        code = getattr(code, "name", code)
        lines.append(f"{where}: {_attr(e, 'desc') or 'no description'}" + (f" [{code}]" if code is not None else ""))
    detail = "\n  ".join(lines) if lines else "(the parser reported no details)"
    return DeployError(f"TensorRT's ONNX parser could not read {path} ({len(lines)} errors):\n  {detail}")


def _read_timing_cache(path: Path | None) -> bytes:
    if path is None or not path.exists():
        return b""
    if not path.is_file():
        raise DeployError(f"timing cache {path} is not a regular file")
    return path.read_bytes()


def _check_qdq_ready(model_path: Path) -> None:
    try:
        from llama3_deploy.calibration.trt_check import require_tensorrt_ready
    except ImportError as e:
        raise DeployError(f"checking a Q/DQ export before building needs the onnx package (missing: {e.name}): "
                          "pip install onnx, or pip install 'llama3-deploy[export]'") from None
    require_tensorrt_ready(model_path)


def _copy_side_files(model_dir: Path, tmp: Path) -> list[str]:
    """The export's manifest, configs and tokenizer files (what a Generator reads), each resolving inside it."""
    copied = []
    for name in eng.SIDE_FILES:
        path = contained_file(model_dir, name, what=name)
        if path is not None:
            shutil.copyfile(path, tmp / name)
            copied.append(name)
    return copied


def _build(trt, model_path: Path, profiles: list[eng.Profile], workspace: int, cache_data: bytes):
    """(serialized engine, serialized timing cache). Every TensorRT call of a build, in order."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        raise _parser_errors(parser, model_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    for p in profiles:  # index 0 prefill, 1 decode: the runtime's contexts select them by index
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise DeployError(f"TensorRT refused the {p.name} optimization profile: {p.to_json()['shapes']}")
    cache = config.create_timing_cache(cache_data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise DeployError("the timing cache does not match this TensorRT version or GPU; delete it or give another "
                          "--timing-cache file")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployError(f"TensorRT could not build an engine from {model_path} (its messages above say why; "
                          "a larger --workspace-gib, or smaller --max-batch/--max-context, may help)")
    return serialized, config.get_timing_cache().serialize()


def build_engine(model_dir: str | Path, output: str | Path, *, max_batch: int = 1, max_context: int | None = None,
                 prefill_chunk: int | None = None, workspace_gib: float = DEFAULT_WORKSPACE_GIB,
                 timing_cache: str | Path | None = None, device: int = 0, overwrite: bool = False,
                 progress: bool = True) -> EngineResult:
    """Build a TensorRT engine for CUDA device `device` from a portable or Q/DQ export.

    max_context: cached + new tokens per row (default min(4096, the model's context)); prefill_chunk: prompt
    tokens per prefill run (default min(512, max_context)); timing_cache: a file reused across builds (created
    if absent). Everything is checked before TensorRT is asked to build; on any error nothing is left behind.
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    m = _open_export(model_dir)
    limits = _limits(m.config, max_batch, max_context, prefill_chunk)
    profiles = eng.profiles(m.io, m.config, limits)
    workspace = _workspace_bytes(workspace_gib)
    if not isinstance(device, int) or isinstance(device, bool) or device < 0:
        raise DeployError(f"device must be a CUDA device index >= 0, not {device!r}")
    prec = eng.precision(m.raw, m.io)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_data = _read_timing_cache(cache_path)
    check_output_dir(output, overwrite=overwrite, protect=[model_dir])
    trt, cudart = _load()
    from llama3_deploy.runtime.tensorrt import cuda_check, gpu_properties
    cuda_check(cudart, cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
    gpu_name, cc = gpu_properties(cudart, device)
    eng.check_compute_capability(prec, gpu_name, cc)  # before any build
    model_path = model_dir / contract.MODEL_FILE
    if prec["qdq_format"] is not None:
        _say(progress, "checking the Q/DQ graph against TensorRT's explicit-quantization rules")
        _check_qdq_ready(model_path)
    onnx_sha = eng.sha256_file(model_path)
    with atomic_directory(output, overwrite=overwrite, protect=[model_dir]) as tmp:
        _say(progress, f"building with TensorRT {trt.__version__} on {gpu_name} ({cc[0]}.{cc[1]}): "
                       f"{limits.max_batch} rows, context {limits.max_context}, chunks of {limits.prefill_chunk}")
        t1 = time.perf_counter()
        serialized, cache_out = _build(trt, model_path, profiles, workspace, cache_data)
        build_s = time.perf_counter() - t1
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cache_path, cache_out)
        engine_path = tmp / eng.ENGINE_FILE
        with open(engine_path, "wb") as f:
            f.write(memoryview(serialized))
        _copy_side_files(model_dir, tmp)
        manifest = eng.EngineManifest(
            tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=tuple(cc),
            source_onnx_sha256=onnx_sha, source_manifest=m.raw, limits=limits, profiles=tuple(profiles),
            precision=prec, engine_sha256=eng.sha256_file(engine_path), engine_bytes=engine_path.stat().st_size,
            build={"workspace_bytes": workspace, "timing_cache": str(cache_path) if cache_path else None,
                   "build_s": round(build_s, 2), "total_s": round(time.perf_counter() - t0, 2),
                   "source_dir": str(model_dir.resolve())})
        manifest.write(tmp)
    _say(progress, f"engine written to {output}")
    return EngineResult(Path(output), manifest)
