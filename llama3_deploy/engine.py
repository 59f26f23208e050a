"""A TensorRT engine directory: its file names, the optimization profiles a build uses, and the manifest that
vouches for the engine. No TensorRT here (export/tensorrt.py builds, runtime/tensorrt.py runs).

An engine is executable code for one TensorRT version on one GPU model: `verify_engine` refuses one whose
manifest is missing or malformed, that was built by another TensorRT version or for another GPU (name or
compute capability), or whose file is not byte for byte the one the manifest names (sha256).

Profiles come from the I/O contract's symbolic axes, so every input is covered by name:
    prefill  B 1..max_batch, S 1..prefill_chunk, P 0..max_context-1
    decode   B 1..max_batch, S = 1,              P 0..max_context-1
with T = P + S. TensorRT checks each profile's min, opt and max points against the shape constraints it infers
from the graph (the mask's T must equal P + S where the graph adds them), so each point is a consistent
(B, S, P) triple and T is derived: the prefill max point (S = chunk, P = max_context - 1) has a mask of
max_context + chunk - 1, a shape the runtime never binds (it keeps P + S <= max_context), but without which
a last prefill chunk at P > max_context - chunk would fall outside the profile.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from . import contract
from .config import LlamaConfig, read_json
from .errors import DeployError
from .manifest import MANIFEST_FILE

ENGINE_FILE = "model.engine"
ENGINE_MANIFEST_FILE = "engine.json"
FORMAT = "llama3-deploy/tensorrt-engine"
PREFILL, DECODE = "prefill", "decode"
FP8_MIN_CC = (8, 9)   # Ada / Hopper: TensorRT's FP8 kernels
INT8_MIN_CC = (7, 5)  # Turing: INT8 tensor cores for explicit (Q/DQ) quantization
# The files a Generator reads beside the engine, copied from the export.
SIDE_FILES = (MANIFEST_FILE, "config.json", "generation_config.json", *contract.TOKENIZER_FILES)

Shape = tuple[int, ...]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The largest step an engine accepts: rows, cached + new tokens, new tokens per prefill run."""

    max_batch: int
    max_context: int
    prefill_chunk: int

    def check(self, config: LlamaConfig) -> Limits:
        """Refuse impossible limits with the option to change; returns self."""
        for name in ("max_batch", "max_context", "prefill_chunk"):
            if not _is_int(getattr(self, name)):
                raise DeployError(f"{name} must be an integer, not {getattr(self, name)!r}")
        if self.max_batch < 1:
            raise DeployError(f"max_batch must be >= 1 (got {self.max_batch})")
        if not 1 <= self.prefill_chunk <= self.max_context:
            raise DeployError(f"prefill_chunk must be from 1 to max_context {self.max_context} "
                              f"(got {self.prefill_chunk})")
        if self.max_context > config.max_position_embeddings:
            raise DeployError(f"max_context {self.max_context} exceeds the model's context of "
                              f"{config.max_position_embeddings} tokens")
        return self


@dataclasses.dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes, in the contract's input order."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_json(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_json(cls, d: dict) -> Profile:
        shapes = {}
        for k, v in d["shapes"].items():
            if len(v) != 3 or not all(isinstance(s, list) and all(_is_int(x) for x in s) for s in v):
                raise ValueError(f"profile {d['name']!r} input {k!r}: expected [min, opt, max] integer shapes")
            shapes[k] = tuple(tuple(s) for s in v)
        return cls(str(d["name"]), shapes)

    def contains(self, name: str, shape: Shape) -> bool:
        lo, _, hi = self.shapes[name]
        return len(shape) == len(lo) and all(a <= x <= b for a, x, b in zip(lo, shape, hi))


def _shape(spec: contract.TensorSpec, b: int, s: int, p: int) -> Shape:
    axes = {contract.BATCH: b, contract.SEQUENCE: s, contract.PAST_SEQUENCE: p, contract.TOTAL_SEQUENCE: p + s}
    out = []
    for d in spec.shape:
        if isinstance(d, int):
            out.append(d)
        elif d in axes:
            out.append(axes[d])
        else:  # MAX_SEQUENCE: the optimized flavor, which TensorRT cannot parse anyway
            raise DeployError(f"input {spec.name} has axis {d!r}, which has no TensorRT profile "
                              "(portable exports only)")
    return tuple(out)


def profiles(io: contract.DecoderIO, config: LlamaConfig, limits: Limits) -> list[Profile]:
    """The prefill and decode profiles (in that order: profile index 0 and 1) for every input of `io`."""
    limits.check(config)
    B, C, M = limits.max_batch, limits.prefill_chunk, limits.max_context
    points = {  # (B, S, P) at min, opt, max; opt: what the build tunes kernels for
        PREFILL: ((1, 1, 0), (B, C, 0), (B, C, M - 1)),          # opt: a first chunk
        DECODE: ((1, 1, 0), (B, 1, M // 2), (B, 1, M - 1)),      # opt: halfway through the context
    }
    return [Profile(name, {s.name: tuple(_shape(s, *pt) for pt in pts) for s in io.inputs})
            for name, pts in points.items()]


# --- precision ------------------------------------------------------------------------------------------
def qdq_format(raw_manifest: dict) -> str | None:
    """The Q/DQ format ("int8", "fp8") an export's manifest records, or None for an unquantized graph."""
    record = raw_manifest.get("qdq")
    if record is None and isinstance(raw_manifest.get("transform"), dict):
        record = raw_manifest["transform"] if raw_manifest["transform"].get("name") == "qdq" else None
    if record is None:
        return None
    fmt = record.get("format") if isinstance(record, dict) else None
    if fmt not in ("int8", "fp8"):
        raise DeployError(f"the export manifest's qdq record has an unknown format {fmt!r} (expected int8 or fp8)")
    return fmt


def precision(raw_manifest: dict, io: contract.DecoderIO) -> dict:
    """Weight dtype, Q/DQ format and KV cache dtype (read from the I/O contract, never assumed)."""
    kv = next((s.dtype for s in io.inputs if s.name in io.past_names), raw_manifest.get("dtype"))
    return {"weight_dtype": raw_manifest.get("dtype"), "qdq_format": qdq_format(raw_manifest), "kv_dtype": kv}


def check_compute_capability(prec: dict, gpu_name: str, cc: tuple[int, int]) -> None:
    """Refuse, before any build, a GPU without the kernels the precision needs."""
    fp8 = prec.get("qdq_format") == "fp8" or prec.get("kv_dtype") == "float8e4m3fn"
    int8 = prec.get("qdq_format") == "int8" or prec.get("kv_dtype") == "int8"
    for needed, minimum, what in ((fp8, FP8_MIN_CC, "FP8 (E4M3)"), (int8, INT8_MIN_CC, "INT8 Q/DQ")):
        if needed and tuple(cc) < minimum:
            raise DeployError(f"{what} engines need compute capability >= {minimum[0]}.{minimum[1]}; {gpu_name} is "
                              f"{cc[0]}.{cc[1]}" + (" (FP8 needs an Ada or Hopper GPU or newer; use an int8 or "
                                                    "unquantized export here)" if minimum == FP8_MIN_CC else ""))


# --- the manifest ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EngineManifest:
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    source_onnx_sha256: str
    source_manifest: dict        # the export's manifest.json, as built from
    limits: Limits
    profiles: tuple[Profile, ...]
    precision: dict              # weight_dtype, qdq_format (None: unquantized), kv_dtype
    engine_sha256: str
    engine_bytes: int
    build: dict = dataclasses.field(default_factory=dict)  # workspace, timing cache, build time

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": 1, "tensorrt_version": self.tensorrt_version,
                "gpu": {"name": self.gpu_name, "compute_capability": list(self.compute_capability)},
                "engine": {"file": ENGINE_FILE, "sha256": self.engine_sha256, "bytes": self.engine_bytes},
                "source": {"onnx_sha256": self.source_onnx_sha256, "manifest": self.source_manifest},
                "limits": dataclasses.asdict(self.limits), "profiles": [p.to_json() for p in self.profiles],
                "precision": self.precision, "build": self.build}

    @classmethod
    def from_json(cls, d: dict, *, path: Path | str = ENGINE_MANIFEST_FILE) -> EngineManifest:
        """Parse and type-check; anything missing or mistyped is a DeployError naming `path`."""
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r} is not {FORMAT!r}")
            cc = d["gpu"]["compute_capability"]
            if not (isinstance(cc, list) and len(cc) == 2 and all(_is_int(x) for x in cc)):
                raise ValueError(f"compute_capability must be [major, minor], not {cc!r}")
            texts = (d["tensorrt_version"], d["gpu"]["name"], d["engine"]["sha256"], d["source"]["onnx_sha256"])
            if not all(isinstance(t, str) and t for t in texts):
                raise ValueError("tensorrt_version, gpu name and sha256 fields must be non-empty strings")
            if not isinstance(d["source"]["manifest"], dict) or not isinstance(d["precision"], dict):
                raise ValueError("source.manifest and precision must be JSON objects")
            if not _is_int(d["engine"]["bytes"]):
                raise ValueError("engine.bytes must be an integer")
            limits = Limits(**d["limits"])
            profs = tuple(Profile.from_json(p) for p in d["profiles"])
            if [p.name for p in profs] != [PREFILL, DECODE]:
                raise ValueError(f"profiles must be {PREFILL} and {DECODE}, got {[p.name for p in profs]}")
            return cls(texts[0], texts[1], (cc[0], cc[1]), texts[3], d["source"]["manifest"], limits, profs,
                       d["precision"], texts[2], d["engine"]["bytes"], dict(d.get("build") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DeployError(f"engine manifest {path} is malformed ({type(e).__name__}: {e}); rebuild the "
                              "engine with llama3-deploy build-engine") from None

    def write(self, engine_dir: Path | str) -> None:
        (Path(engine_dir) / ENGINE_MANIFEST_FILE).write_text(json.dumps(self.to_json(), indent=2))


def sha256_file(path: Path | str, *, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in chunks (engines and graphs can be many GiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cc(cc) -> str:
    return f"{cc[0]}.{cc[1]}"


def _checked_manifest(engine_dir: Path, trt_version: str, gpu_name: str,
                      compute_capability: tuple[int, int]) -> EngineManifest:
    if not engine_dir.is_dir():
        raise DeployError(f"engine directory not found: {engine_dir}")
    path = engine_dir / ENGINE_MANIFEST_FILE
    if not path.exists():
        raise DeployError(f"{engine_dir} has no {ENGINE_MANIFEST_FILE}: an engine without its manifest cannot be "
                          "verified and is not loaded (build it with llama3-deploy build-engine)")
    m = EngineManifest.from_json(read_json(path, what="engine manifest"), path=path)
    source = m.source_manifest.get("source")
    model = source.get("model") if isinstance(source, dict) else None
    rebuild = f"rebuild it here with llama3-deploy build-engine --model {model or 'EXPORT_DIR'}"
    if m.tensorrt_version != trt_version:
        raise DeployError(f"{engine_dir} was built by TensorRT {m.tensorrt_version}, this is TensorRT {trt_version}; "
                          f"engines are not portable across versions: {rebuild}")
    if m.gpu_name != gpu_name or tuple(m.compute_capability) != tuple(compute_capability):
        raise DeployError(f"{engine_dir} was built for {m.gpu_name} (compute capability {_cc(m.compute_capability)}), "
                          f"this GPU is {gpu_name} ({_cc(compute_capability)}); engines are built for one GPU "
                          f"model: {rebuild}")
    copy = engine_dir / MANIFEST_FILE
    if not copy.is_file() or read_json(copy, what="export manifest") != m.source_manifest:
        raise DeployError(f"{copy} is missing or differs from the export manifest recorded in {path}; "
                          "the engine directory was modified: rebuild it")
    return m


def _check_hash(engine_dir: Path, m: EngineManifest, sha256: str) -> None:
    if sha256 != m.engine_sha256:
        raise DeployError(f"{engine_dir / ENGINE_FILE} does not match its manifest (sha256 {sha256[:16]}... vs "
                          f"recorded {m.engine_sha256[:16]}...): it was modified or replaced; not loading it")


def verify_engine(engine_dir: Path | str, *, trt_version: str, gpu_name: str,
                  compute_capability: tuple[int, int]) -> EngineManifest:
    """The engine manifest of `engine_dir`, after refusing an engine this process cannot vouch for.

    Refused, each with its own message: a missing or malformed manifest, another TensorRT version, another GPU
    name or compute capability, an export manifest copy that differs from the recorded one, a missing engine
    file, or one whose sha256 differs from the recorded one.
    """
    engine_dir = Path(engine_dir)
    m = _checked_manifest(engine_dir, trt_version, gpu_name, compute_capability)
    path = engine_dir / ENGINE_FILE
    if not path.is_file():
        raise DeployError(f"{engine_dir} is missing its engine file {ENGINE_FILE}")
    _check_hash(engine_dir, m, sha256_file(path))
    return m


def read_engine(engine_dir: Path | str, *, trt_version: str, gpu_name: str,
                compute_capability: tuple[int, int]) -> tuple[EngineManifest, bytes]:
    """(manifest, engine bytes), refused as `verify_engine` refuses; the hash checked is that of the very bytes
    returned, so a file swapped after the check is never deserialized."""
    engine_dir = Path(engine_dir)
    m = _checked_manifest(engine_dir, trt_version, gpu_name, compute_capability)  # before reading GiBs
    path = engine_dir / ENGINE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DeployError(f"{engine_dir} is missing its engine file {ENGINE_FILE}") from None
    except OSError as e:
        raise DeployError(f"cannot read {path}: {e.strerror}") from None
    _check_hash(engine_dir, m, hashlib.sha256(data).hexdigest())
    return m, data
