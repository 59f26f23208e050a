"""`llama3-deploy bench` (also `python -m llama3_deploy.benchmarks`): latency and memory of this project's runtime
against PyTorch and peers on one checkpoint, each result beside its physical floor.

    llama3-deploy bench --model random:llama3-cpu-bench --engines ort,torch-eager,optimum,genai \
        --cells 128x1,512x1,2048x1,128x4,128x8 --new-tokens 32 --reps 3

Writes `<output-dir>/<name>.json` (everything, raw timings included), `<name>.md` and PNG plots.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path


DEFAULT_ENGINES = "ort,torch-eager,optimum,genai"
DEFAULT_CELLS = "128x1,512x1,2048x1,128x4,128x8"
GENAI_PYTHON = "benchmarks/.venv-genai/bin/python"
LLAMACPP_PYTHON = "benchmarks/.venv-llamacpp/bin/python"
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="random:llama3-cpu-bench", help="checkpoint directory or random:PRESET")
    p.add_argument("--dtype", default="float32", choices=sorted(SHORT), help="precision of the checkpoint and engines")
    p.add_argument("--genai-precisions", default=None,
                   help="onnxruntime-genai builds, comma separated: float32, float16, int8, int4 (default: --dtype)")
    p.add_argument("--ort-dtypes", default=None, help="this project's exports, comma separated: float32/float16/"
                                                       "bfloat16 (portable graph) or opt-float32, opt-float16, "
                                                       "opt-int8, opt-int4 (optimized graph) "
                   "(default: --dtype)")
    p.add_argument("--llamacpp-precisions", default="q8_0",
                   help="llama.cpp GGUF builds, comma separated: f32, f16, bf16, q8_0, q4_0")
    p.add_argument("--engines", default=DEFAULT_ENGINES,
                   help="comma separated: ort, torch-eager, torch-compile, optimum, genai, llamacpp")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cells", default=DEFAULT_CELLS, help="prompt length x batch, comma separated")
    p.add_argument("--new-tokens", type=int, default=32, help="forced greedy tokens per row")
    p.add_argument("--reps", type=int, default=3, help="timed rounds per cell")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per engine per cell")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per engine (0: the engine's default)")
    p.add_argument("--work-dir", default="work-out/bench", help="where checkpoints and exports are built and cached")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--name", default=None, help="file stem of the outputs (default: <device>-<model>-<dtype>)")
    p.add_argument("--genai-python", default=GENAI_PYTHON, help="Python of the onnxruntime-genai venv")
    p.add_argument("--llamacpp-python", default=LLAMACPP_PYTHON,
                   help="Python of the llama.cpp venv (benchmarks/peers/setup_llamacpp.sh)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory for checkpoints without one (llama.cpp's converter needs it), "
                        "e.g. ../shared/llama3/tokenizer")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of torch-compile")
    p.add_argument("--compile-max-cache-len", type=int, default=0,
                   help="torch-compile's static cache length (0: prompt + new tokens of each cell)")
    p.add_argument("--scope", default="cell", choices=["cell", "run"],
                   help="fresh engine processes per cell (memory per cell) or one per engine for the run")
    p.add_argument("--quick-floor", action="store_true", help="small floor measurements (tests)")
    p.add_argument("--prepare-only", action="store_true",
                   help="build (or reuse) the artifacts, run nothing; with --name, write <name>.json/.md: each "
                        "build's command, time and peak memory, or how it failed (out of memory included)")
    p.set_defaults(run=lambda a: 0 if bench(**{k: v for k, v in vars(a).items()  # not the CLI's own entries
                                               if k not in ("run", "command") and not k.startswith("_")}) else 1)


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, RAM, OS, load, and the GPU where one is used."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
            "loadavg_start": _loadavg()}
    if device.startswith("cuda"):
        try:
            info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        except OSError:
            info["gpu"] = "?"
    info["short"] = info.get("gpu") or f"{cpu}, {info['cpus']} cores"
    return info


def _loadavg() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def git_info() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _build_key(kind: str, variant: str) -> str:
    """The `builds` entry of an engine: ours and genai have one build per variant/precision, the others one."""
    return f"{kind}-{variant}" if kind in ("ort", "genai", "llamacpp") else kind


def _specs(kinds, builds, *, dtype, ort_dtypes, device, threads, genai_python, compile_backend, compile_max_cache_len,
           genai_precisions, llamacpp_python=LLAMACPP_PYTHON, llamacpp_precisions=(), max_batch=8):
    from .harness import EngineSpec
    specs = []
    for kind in kinds:
        if kind == "ort":
            # optimized exports on CUDA replay a captured decode step (CUDA graphs)
            specs += [EngineSpec("ort", builds[_build_key("ort", d)]["path"], device, d, threads, label=f"ort:{d}",
                                 options={"cuda_graph": True} if device.startswith("cuda") and d.startswith("opt-")
                                 else {})
                      for d in ort_dtypes if _build_key("ort", d) in builds]
        elif kind == "genai":
            python = str(Path(genai_python).absolute())
            specs += [EngineSpec("genai", builds[_build_key("genai", p)]["path"], device, p, threads,
                                 label=f"genai:{p}", python=python)
                      for p in genai_precisions if _build_key("genai", p) in builds]
        elif kind == "llamacpp":
            python = str(Path(llamacpp_python).absolute())
            specs += [EngineSpec("llamacpp", builds[_build_key("llamacpp", p)]["path"], device, p, threads,
                                 label=f"llamacpp:{p}", python=python, options={"max_batch": max_batch})
                      for p in llamacpp_precisions if _build_key("llamacpp", p) in builds]
        elif kind in builds:
            opts = ({"backend": compile_backend, "max_cache_len": compile_max_cache_len}
                    if kind == "torch-compile" else {})
            specs.append(EngineSpec(kind, builds[kind]["path"], device, dtype, threads, label=f"{kind}:{dtype}",
                                    python=sys.executable, options=opts))
    return specs


def prepare(model: str, work: Path, *, kinds: list[str], dtype: str, ort_dtypes: list[str], device: str, seed: int,
            genai_python: str, genai_precisions: list[str], llamacpp_python: str = LLAMACPP_PYTHON,
            llamacpp_precisions: list[str] = (), tokenizer: str | None = None, log=print) -> tuple[dict, list[dict]]:
    """Build (or reuse) every artifact; returns ({name: build info}, [{engine, reason} that cannot run])."""
    from .peers import artifacts as A
    work.mkdir(parents=True, exist_ok=True)
    builds, skipped = {}, []
    builds["checkpoint"] = A.checkpoint(model, work, dtype=dtype, seed=seed)
    ckpt = builds["checkpoint"]["path"]
    log(f"checkpoint: {ckpt} ({builds['checkpoint']['seconds']} s)")
    steps = []
    if "ort" in kinds:
        steps += [(_build_key("ort", d), f"llama3-deploy ort ({d})", lambda d=d: A.ours(ckpt, work, variant=d))
                  for d in ort_dtypes]
    for kind in ("torch-eager", "torch-compile"):
        if kind in kinds:
            builds[kind] = {"path": ckpt, "command": None, "seconds": 0.0, "cached": True}
    if "optimum" in kinds:
        steps.append(("optimum", "optimum ORTModelForCausalLM",
                      lambda: A.optimum(ckpt, work, dtype=dtype, device=device)))
    if "genai" in kinds:
        steps += [(_build_key("genai", p), f"onnxruntime-genai ({p})",
                   lambda p=p: A.genai(ckpt, work, dtype=p, python=genai_python, device=device))
                  for p in genai_precisions]
    if "llamacpp" in kinds:
        steps += [(_build_key("llamacpp", p), f"llama.cpp ({p})",
                   lambda p=p: A.llamacpp(ckpt, work, precision=p, python=str(Path(llamacpp_python).absolute()),
                                          tokenizer=tokenizer))
                  for p in llamacpp_precisions]
    for name, engine, build in steps:
        try:
            builds[name] = build()
            log(f"{name}: {builds[name]['path']} ({'cached' if builds[name]['cached'] else builds[name]['seconds']} s)")
        except A.BuildError as e:
            skipped.append({"engine": engine, "reason": str(e), **({"memory": e.memory} if e.memory else {})})
            log(f"{name}: cannot build: {str(e).splitlines()[0]}")
    return builds, skipped


def bench(*, model: str = "random:llama3-cpu-bench", dtype: str = "float32", ort_dtypes: str | None = None,
          engines: str = DEFAULT_ENGINES, device: str = "cpu", cells: str = DEFAULT_CELLS, new_tokens: int = 32,
          reps: int = 3, warmup: int = 1, seed: int = 0, threads: int = 0, work_dir: str = "work-out/bench",
          output_dir: str = "benchmarks/results", name: str | None = None, genai_python: str = GENAI_PYTHON,
          compile_backend: str = "inductor", compile_max_cache_len: int = 0, scope: str = "cell",
          quick_floor: bool = False, prepare_only: bool = False, genai_precisions: str | None = None,
          llamacpp_precisions: str = "q8_0", llamacpp_python: str = LLAMACPP_PYTHON, tokenizer: str | None = None,
          log=print) -> dict:
    """Build the artifacts, measure the floor, run the matrix, measure the floor again, write the report."""
    from llama3_deploy.config import load_config

    from . import floor as F
    from . import harness as H
    from . import report
    from .peers import artifacts as A

    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    kinds = [k.strip() for k in engines.split(",") if k.strip()]
    ort_list = [d.strip() for d in (ort_dtypes or dtype).split(",") if d.strip()]
    genai_list = [p.strip() for p in (genai_precisions or dtype).split(",") if p.strip()]
    llamacpp_list = [p.strip() for p in llamacpp_precisions.split(",") if p.strip()]
    work = Path(work_dir).resolve()
    machine = machine_info(device)
    git = git_info()  # the tree as the run starts
    builds, skipped = prepare(model, work, kinds=kinds, dtype=dtype, ort_dtypes=ort_list, device=device, seed=seed,
                              genai_python=genai_python, genai_precisions=genai_list,
                              llamacpp_python=llamacpp_python, llamacpp_precisions=llamacpp_list, tokenizer=tokenizer,
                              log=log)
    if prepare_only:
        if name:  # the builds are the result: each tool's command, time, peak memory, or how it failed
            from .report import write_builds_report
            write_builds_report({"schema": "llama3-deploy/bench-builds", "model": model, "dtype": dtype,
                                 "weights": ("seeded random (not trained)" if model.startswith("random:")
                                             else "as given"),
                                 "command": _command_line(), "started": started.isoformat(timespec="seconds"),
                                 "wall_s": round(time.perf_counter() - t_start, 1), "git": git, "machine": machine,
                                 "versions": _versions(kinds, genai_python),
                                 "builds": builds, "skipped": skipped}, output_dir, name)
        return {"builds": builds, "skipped": skipped}
    config = load_config(Path(builds["checkpoint"]["path"]))
    specs = _specs(kinds, builds, dtype=dtype, ort_dtypes=ort_list, device=device, threads=threads,
                   genai_python=genai_python, compile_backend=compile_backend,
                   compile_max_cache_len=compile_max_cache_len, genai_precisions=genai_list,
                   llamacpp_python=llamacpp_python, llamacpp_precisions=llamacpp_list,
                   max_batch=max(c.batch for c in H.parse_cells(cells)))
    floor_dtype = "float32" if not device.startswith("cuda") else dtype
    log("measuring the floor (bandwidth, matmul rate) ...")
    floor_start = F.measure_machine(device, dtype=floor_dtype, quick=quick_floor)
    cell_list = H.parse_cells(cells)
    pname = model[len("random:"):] if model.startswith("random:") else Path(model).name
    stem = name or f"{device.split(':')[0]}-{pname}-{SHORT[dtype]}"
    partial = Path(output_dir) / f"{stem}.partial.json"

    def save_partial(results: list[dict], errors: list[dict]) -> None:
        """Results so far (no end-of-run floor yet), in case a time limit ends the run early."""
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"note": "partial: the run did not finish", "floor_start": floor_start,
                                       "machine": machine, "results": results, "errors": errors}, indent=1))

    results, errors = H.run_matrix(specs, cell_list, config=config, new_tokens=new_tokens, reps=reps, warmup=warmup,
                                   seed=seed, log_dir=work / "logs", scope=scope, on_cell=save_partial, log=log)
    floor_end = F.measure_machine(device, dtype=floor_dtype, quick=quick_floor)
    bw = max(floor_start["bandwidth"]["bytes_per_s"], floor_end["bandwidth"]["bytes_per_s"])
    mm = max(floor_start["matmul"]["flops_per_s"], floor_end["matmul"]["flops_per_s"])
    for r in results:
        H.attach_floor(r, F.floor_for(config, r["dtype"], r["batch"], r["prompt_len"], new_tokens, bw, mm))
    machine["loadavg_end"] = _loadavg()
    seen = {}
    for r in results:
        seen.setdefault(r["key"], r)
    engine_list = []
    for s in specs:
        b = builds.get(_build_key(s.kind, s.dtype), {})
        first = seen.get(s.key)
        engine_list.append({"key": s.key, "kind": s.kind, "engine": first["engine"] if first else s.key,
                            "version": first["version"] if first else None, "dtype": s.dtype, "device": s.device,
                            "python": s.python, "artifact": b.get("path"), "build_command": b.get("command"),
                            "build_s": b.get("seconds"), "options": s.options,
                            "artifact_note": _artifact_note(s.kind, b),
                            **({"env_versions": A.venv_versions(s.python, ("onnxruntime-genai", "onnxruntime",
                                                                             "transformers", "torch"))}
                               if s.kind == "genai" else {}),
                            **({"env_versions": A.venv_versions(s.python, ("llama_cpp_python", "gguf", "torch"))}
                               if s.kind == "llamacpp" else {})})
    versions = _versions(kinds, genai_python)
    doc = {
        "schema": "llama3-deploy/bench", "schema_version": 1,
        "title": f"{device.split(':')[0].upper()} latency: {pname} ({SHORT[dtype]}), this runtime vs PyTorch and peers",
        "weights": "seeded random (not trained): latency and memory are meaningful, output quality is not",
        "model": {"name": pname, "source": model, "checkpoint": builds["checkpoint"]["path"], "seed": seed,
                  "dtype": dtype, "parameters": config.num_parameters(), "config": config.to_hf_dict()},
        "command": _command_line(),
        "started": started.isoformat(timespec="seconds"), "wall_s": None, "git": git, "machine": machine,
        "versions": versions,
        "protocol": {"cells": [str(c) for c in cell_list], "new_tokens": new_tokens, "reps": reps, "warmup": warmup,
                     "seed": seed, "threads": threads or "engine default", "decoding": "greedy, EOS ignored / "
                     "min_length = max_length, forced token count", "prompts": "seeded random ids, no BOS/EOS ids, "
                     "one length per batch (no padding)", "order": "engines interleaved, order rotated each round",
                     "statistic": "median over rounds of each round's figure",
                     "process": "each engine in its own worker process, " + (
                         "started fresh per cell" if scope == "cell" else "one per engine for the whole run "
                         "(memory figures: peak so far in the run, cells in the order listed)"),
                     "scope": scope,
                     "rss": "peak_rss_bytes: the worker's kernel high-water mark over its life (load, warm-up, "
                            "rounds); peak_rss_generate_bytes: the mark reset before and read after each run, max",
                     "device_memory": "torch.cuda.max_memory_reserved for PyTorch engines; nvidia-smi per-process "
                                      "used memory after each run otherwise (ONNX Runtime arenas only grow)",
                     "timing": "time.perf_counter around each engine's calls; TTFT from the request to the first "
                               "greedy token on the host (buffer/cache setup included); each decode step until its "
                               "token is on the host"},
        "floor": {"bandwidth_bytes_per_s": bw, "matmul_flops_per_s": mm, "matmul_dtype": floor_start["matmul"]["dtype"],
                  "start": floor_start, "end": floor_end, "method": F.__doc__.strip()},
        "engines": engine_list, "skipped": skipped, "errors": errors, "builds": builds, "results": results,
    }
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    paths = report.write_report(doc, output_dir, stem)
    partial.unlink(missing_ok=True)
    report.print_table(doc)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return doc


def _versions(kinds: list[str], genai_python: str) -> dict:
    """This environment's tool versions, the peers' packages in it, and the genai venv's when genai runs."""
    from llama3_deploy.manifest import tool_versions

    from .peers import artifacts as A
    versions = tool_versions()
    here = A.venv_versions(sys.executable, ("optimum", "optimum-onnx", "matplotlib"))
    versions.update({pkg: here.get(pkg, "absent") for pkg in ("optimum", "optimum-onnx", "matplotlib")})
    if "genai" in kinds:
        versions["genai_venv"] = A.venv_versions(genai_python, ("onnxruntime-genai", "onnxruntime", "torch",
                                                                "transformers", "onnx", "onnx-ir"))
    return versions


def _command_line() -> str:
    """How this run was started, as a user would type it."""
    argv = list(sys.argv)
    if not argv or not argv[0]:
        return "llama3_deploy.benchmarks.cli.bench(...)"
    if argv[0].endswith("__main__.py"):
        argv[0:1] = ["python", "-m", "llama3_deploy.benchmarks"]
    elif Path(argv[0]).name in ("llama3-deploy", "__main__.py", "cli.py"):
        argv[0] = "llama3-deploy"
    else:
        argv[0] = Path(argv[0]).name
    return " ".join(shlex.quote(a) for a in argv)


def _artifact_note(kind: str, build: dict) -> str | None:
    """The build command as a reader would type it (repository-relative paths, `python`)."""
    if not build or not build.get("command"):
        return "the checkpoint (transformers from_pretrained)" if kind.startswith("torch") else None
    repo = str(Path(__file__).resolve().parent.parent) + os.sep
    cmd = build["command"].replace(sys.executable + " ", "python ").replace(repo, "")
    cmd = cmd.replace(os.path.dirname(sys.executable) + os.sep, "")
    return f"`{cmd}` ({build['seconds']} s)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama3_deploy.benchmarks", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return int(args.run(args) or 0)
