"""The GPU benchmark in one command, for the lent GPU machine (one H100; see ../shared/device/README.md).

Full-size Meta-Llama-3-8B architecture, fp16, seeded random weights made there; this project's
runtime on ONNX Runtime's CUDA execution provider against PyTorch eager and PyTorch with a static
cache + torch.compile, same checkpoint, same protocol as `llama3-deploy bench`; prints a short table
and writes the full JSON (+ Markdown, PNGs, build and worker logs) under $OUT.

1. Stage ONNX Runtime's CUDA build (here, from the project root; the wheel lands in the git-ignored
   .whl/, never in the repository):   bash ../shared/device/stage-ort-gpu.sh
   and make the five carry calls it prints (`run carry=[".whl/part-K"] command: ls -la .whl/part-K`).
2. One device call, the install line the script printed, then this module:
     cat .whl/part-*/ort-gpu.* > .whl/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl \
       && python3 -m pip install -q --no-index --no-deps --no-compile --target .whl/site .whl/onnxruntime_gpu-*.whl \
       && export PYTHONPATH=$PWD/.whl/site:${PYTHONPATH:-} && python3 -m llama3_deploy.benchmarks.gpu --out $OUT
   (use the wheel name the script printed). `--phase all` (the default) builds the 8B checkpoint and
   the export, then benchmarks; that may not fit one 10-minute call, so the safe plan is two calls on
   the warm machine: `... python3 -m llama3_deploy.benchmarks.gpu --phase prepare --out $OUT` then
   `... python3 -m llama3_deploy.benchmarks.gpu --phase bench --out $OUT`. Finished artifacts are reused (kept in
   work-out/gpu while the machine stays warm) and results are saved after every cell
   (`<name>.partial.json`), so a call cut short still brings back what it measured.

CPU-side check (no GPU): python -m llama3_deploy.benchmarks.gpu --device cpu --model <checkpoint dir> --dtype float32 ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

GPU_ENGINES = "ort,torch-eager,torch-compile"
GPU_CELLS = "128x1,512x1,2048x1,128x4,128x8"


def preflight(device: str, engines: list[str]) -> dict:
    """What this machine offers: CUDA through torch, the CUDA execution provider through ONNX Runtime."""
    info: dict = {"python": sys.version.split()[0]}
    import onnxruntime as ort
    info["onnxruntime"] = ort.__version__
    info["onnxruntime_file"] = ort.__file__
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("preflight: torch sees no CUDA device")
        info["gpu"] = torch.cuda.get_device_name(0)
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        info["ort_providers"] = ort.get_available_providers()
        if "ort" in engines and "CUDAExecutionProvider" not in info["ort_providers"]:
            raise SystemExit("preflight: this onnxruntime has no CUDAExecutionProvider; stage onnxruntime-gpu "
                             "(../shared/device/stage-ort-gpu.sh) and put .whl/site first on PYTHONPATH")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama3_deploy.benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "work-out/gpu-out"), help="where results go ($OUT)")
    p.add_argument("--model", default="random:meta-llama-3-8b-instruct", help="checkpoint dir or random:PRESET")
    p.add_argument("--dtype", default="float16", help="checkpoint and PyTorch precision")
    p.add_argument("--ort-dtypes", default="float16,opt-float16,opt-float16-int4",
                   help="this project's exports (portable float16/bfloat16; optimized opt-float16, opt-float16-int4)")
    p.add_argument("--engines", default=GPU_ENGINES)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cells", default=GPU_CELLS)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--work-dir", default="work-out/gpu")
    p.add_argument("--phase", default="all", choices=["all", "prepare", "bench"])
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--scope", default="run", choices=["run", "cell"],
                   help="run: load (and compile) each engine once for all cells, as fits the call limit")
    p.add_argument("--quick-floor", action="store_true")
    args = p.parse_args(argv)

    from . import cli
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [k.strip() for k in args.engines.split(",") if k.strip()]
    log_file = open(out / "gpu-bench.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - t0:6.0f} s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    pre = preflight(args.device, kinds)
    log(f"preflight: {json.dumps(pre)}")
    (out / "preflight.json").write_text(json.dumps(pre, indent=1))
    cells = [c for c in args.cells.split(",") if c]
    max_len = max(int(c.split("x")[0]) for c in cells) + args.new_tokens
    common = dict(model=args.model, dtype=args.dtype, ort_dtypes=args.ort_dtypes, engines=args.engines,
                  device=args.device, work_dir=args.work_dir, log=log)
    if args.phase in ("all", "prepare"):
        built = cli.bench(**common, prepare_only=True)
        for name, b in built["builds"].items():
            log(f"built {name}: {b.get('path')} ({'cached' if b.get('cached') else str(b.get('seconds')) + ' s'})")
        for s in built["skipped"]:
            log(f"cannot build {s['engine']}: {s['reason'][:500]}")
        _copy_logs(Path(args.work_dir), out)
        if args.phase == "prepare":
            return 0
    stem = f"gpu-{Path(args.model).name if not args.model.startswith('random:') else args.model[7:]}-" \
           f"{cli.SHORT.get(args.dtype, args.dtype)}"
    doc = cli.bench(**common, cells=args.cells, new_tokens=args.new_tokens, reps=args.reps, warmup=args.warmup,
                    output_dir=str(out), name=stem, compile_backend=args.compile_backend,
                    compile_max_cache_len=max_len, scope=args.scope, quick_floor=args.quick_floor)
    doc["preflight"] = pre
    doc["gpu_command"] = "python3 -m llama3_deploy.benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    _copy_logs(Path(args.work_dir), out)
    log(f"done in {time.perf_counter() - t0:.0f} s; results in {out}")
    return 0 if doc["results"] else 1


def _copy_logs(work: Path, out: Path) -> None:
    """Build and worker logs beside the results (small text files only)."""
    dest = out / "logs"
    for f in list(work.glob("*.log")) + list(work.glob("logs/**/*.log")):
        if f.stat().st_size < (4 << 20):
            target = dest / f.relative_to(work)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


if __name__ == "__main__":
    sys.exit(main())
