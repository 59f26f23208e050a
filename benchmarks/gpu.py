"""The GPU check in one prepared command, sized for a lent GPU machine's 15 minutes of device time.

    python3 -m llama3_deploy.benchmarks.gpu --quick --phase prepare|bench|all --out $OUT [--device cpu]

--phase prepare (needs no CUDA build of ONNX Runtime; started in the background with setsid in the first call)
    exports into --work (default work-out/gpu, git-ignored), each straight from seeded random weights, none
    validated by the exporter (correctness is proven on the device below): the small model (--small: head_dim
    128, GQA 4:1 like the 8B; ~20 M parameters) as optimized fp32 --argmax, optimized fp16 --argmax and
    portable fp32; then the full-size Meta-Llama-3-8B-Instruct architecture from the preset (--model) as the
    optimized fp16 graph with --argmax (step model-opt, 16.1 GB); then, unless --no-int4 and if the disk allows,
    its INT4 twin (MatMulNBits, symmetric blocks of 32, embedding kept fp16). With --int4-only (a model whose
    fp16 weights fit neither GPU nor disk: 70B) the model's only step is model-opt-int4, its token table quantized
    too. Each step first checks the free disk against its size estimated from the config and quantization, and
    is skipped with the reason when short. Progress goes to work/prepare.log (a line per step, every 20 s the
    bytes written) and work/prepare-status-*.json (pid, state, each step's).
--phase bench (after the CUDA build is installed: it joins the staged parts .whl/part-*/ort-gpu.* itself)
    in order of value, rewriting $OUT/gpu-check.json after every result:
    1. correctness on the small model: greedy tokens on CUDA equal the CPU's (fp32, portable and optimized);
       CUDA-graph replay equals uncaptured runs across two generations (fp16); no key/value byte crosses to
       the host during decode (every read-back counted: int64 ids only; node placement from ORT's profiler);
    2. the floor: a 1 GiB device-to-device copy (read + write bytes) and an 8192^3 fp16 GEMM, now; then 8B
       fp16, batch 1, prompt 128, 128 forced tokens (and TTFT at prompt 2048): this runtime with CUDA graphs
       on and off against PyTorch eager (transformers LlamaForCausalLM from the same config, fp16 on CUDA,
       random init: latency does not depend on the values), TTFT, TPOT p50/p90, peak device memory, ratios
       to the floor and to PyTorch; 3. while --budget-s lasts: batch 4 and 8, then the INT4 export.
    With --int4-only, item 2 times the INT4 export as the main model (one load, CUDA graphs on) and item 3 its
    batches. PyTorch eager runs only where its fp16 weights (parameters x 2 bytes) fit the device's memory less
    a margin (10%, at least 4 GiB); else it is skipped with the reason, which the report shows instead of ratios.
    Then $OUT holds gpu-check.json, .md (table, targets), .png, -bench.log and -prepare.log (5 files, small),
    and the table is printed last. The background prepare is SIGSTOPped while timings run.
--phase all: both, one after the other (on CUDA the preparation in a child process, so the bench imports
    the CUDA build of onnxruntime first); the CPU-side test runs the two phases as the device does.
Timing: host clock around each call (this runtime synchronizes its outputs every step; PyTorch copies each
token to the host); warm-up rounds first (they capture the CUDA graphs); TTFT median over rounds, TPOT p50/p90
over every decode step of every round. Peak device memory: cudaMemGetInfo deltas for ONNX Runtime (its arena
is outside torch's allocator), torch.cuda.max_memory_allocated for PyTorch.

Device call plan. Here, first: `bash ../shared/device/stage-ort-gpu.sh` (five parts under the ignored .whl/).
Then six `run`s back to back (the machine goes back after ~30 s idle, and the background preparation with it):
  1. carry [".whl/part-0"]; the machine starts (~1-2 min), then ~30 s:
       python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . && mkdir -p work-out/gpu &&
       (setsid nohup python3 -m llama3_deploy.benchmarks.gpu --quick --phase prepare --work work-out/gpu
       >work-out/gpu/prepare.out 2>&1 </dev/null &) ; sleep 15; cat work-out/gpu/prepare.log;
       tail -n 5 work-out/gpu/prepare.out; ls -la .whl/part-0
  2-5. carry [".whl/part-K"], K = 1..4, ~20-40 s each (a 50 MiB transfer):
       ls -la .whl/part-K; tail -n 2 work-out/gpu/prepare.log
  6. timeout_s 540 (its own --budget-s is 420 s; what is left of the 15 minutes is no room for a rerun):
       python3 -m llama3_deploy.benchmarks.gpu --quick --phase bench --work work-out/gpu --out $OUT
     then give_back at once. It joins and installs the wheel (--ort-parts .whl -> .whl/site, 7 s here, ~10-30 s
     there), runs item 1 and the floor while the 8B export finishes, then items 2 and 3.
Expected (minutes from the first call): call 1 ends ~2-2.5, calls 2-5 ~3.5-5; the preparation (measured here:
the 8B fp16 export from the random source took 333 s wall, 1.4 GiB peak RSS on this 2-core machine, on about one
core: seeded generation plus the 16.1 GB write; the small model's exports run beside it in a child, ~45 s here,
mostly tracing the portable graph) should end ~5.5-7.5; item 1 ~0.5-1 min; item 2 ~3 min (two 8B ONNX Runtime
loads, ~30-60 s each; ~5-10 s of runs per cell; the PyTorch model ~15-30 s); item 3 ~0.5 min for batches 4 and
8; INT4 (its export takes ~1.25x the fp16 one and is paused while timings run) only if it is ready within the
budget. Done ~10-11.5, given back ~11-12 of the 15 minutes. See benchmarks/results/gpu-check-cpu-side.md for
what was measured here.

Second plan: 70B on one 80 GB H100 (only INT4 fits: 70.55 B parameters are 141 GB in fp16; the INT4 export,
token table quantized too, is ~39.7 GB (37 GiB) by gpu_sizes.export_bytes). The same six calls; calls 1 and 6
add --model random:meta-llama-3-70b-instruct --int4-only:
  1. carry [".whl/part-0"]:
       python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . && mkdir -p work-out/gpu &&
       (setsid nohup python3 -m llama3_deploy.benchmarks.gpu --quick --phase prepare --work work-out/gpu
       --model random:meta-llama-3-70b-instruct --int4-only >work-out/gpu/prepare.out 2>&1 </dev/null &) ;
       sleep 15; cat work-out/gpu/prepare.log; tail -n 5 work-out/gpu/prepare.out; ls -la .whl/part-0
  2-5. as above.
  6. timeout_s 540:
       python3 -m llama3_deploy.benchmarks.gpu --quick --phase bench --work work-out/gpu --out $OUT
       --model random:meta-llama-3-70b-instruct --int4-only
Estimate, not a measurement of the device: here, on 2 cores, the 70B INT4 export from the random source writes
about 0.85 GB a minute: 3,117.3 s for the whole export (38.0 GiB; write 2,886 s, validate 227 s) on a quiet machine
(benchmarks/results/export-llama3-70b-int4.json). The device's 16 cores may cut that several-fold, but this is
not certain (the 8B fp16 export ran on about one core), and the export may well not finish inside the 15
minutes. Then the check reports what it measured (item 1 and the floor), the INT4 step as not ready and
PyTorch eager as skipped (141 GB of fp16 weights do not fit 80 GB). The free disk must hold ~44 GB for the
export (estimate + 5% + 2 GiB), else the step is skipped with the free and needed bytes recorded.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from . import gpu_setup as S
from . import gpu_sizes as Z

def parse(argv):
    p = argparse.ArgumentParser(prog="python3 -m llama3_deploy.benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--phase", default="all", choices=["all", "prepare", "bench"])
    p.add_argument("--quick", action="store_true", help="fit the lease: 3 timed rounds, a 420 s bench budget")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="random:meta-llama-3-8b-instruct", help="random:PRESET|DIR, checkpoint, tiny")
    p.add_argument("--small", default="small", help="the correctness model: small, tiny, random:DIR, checkpoint")
    p.add_argument("--dtype", default="float16", help="the timed model's precision (float16 or float32)")
    p.add_argument("--work", default="work-out/gpu", help="exports, prepare log and status (not returned)")
    p.add_argument("--out", default=os.environ.get("OUT") or "work-out/gpu-out", help="results ($OUT)")
    p.add_argument("--ort-parts", default=".whl", help="where the stage script's part-*/ort-gpu.* lie")
    p.add_argument("--budget-s", type=float, default=None, help="bench wall budget (quick: 420 s)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per cell (quick: 3, else 10)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--long-prompt-len", type=int, default=2048)
    p.add_argument("--long-new-tokens", type=int, default=16)
    p.add_argument("--batches", default="4,8", help="item 3's batch sizes")
    p.add_argument("--no-int4", dest="int4", action="store_false")
    p.add_argument("--int4-only", action="store_true",
                   help="export and time only --model's INT4 export (token table quantized too), no fp16 export: for "
                        "a model whose fp16 weights fit neither the GPU nor the disk (70B on one 80 GB H100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="", help=argparse.SUPPRESS)  # a prepare child: these export steps only
    a = p.parse_args(argv)
    if a.int4_only and not a.int4:
        p.error("--int4-only times the INT4 export: it cannot go with --no-int4")
    a.argv = list(argv)
    a.budget_s = a.budget_s or (420.0 if a.quick else 3600.0)
    a.reps = a.reps or (3 if a.quick else 10)
    return a


# --- prepare -------------------------------------------------------------------------------------------
def _export_steps(args, work: Path):
    from .gpu_checks import model_source
    small, model = model_source(args.small, work), model_source(args.model, work)
    opt = dict(flavor="optimized", argmax=True)
    steps = {"small-opt-fp32": (small, dict(dtype="float32", **opt)),
             "small-opt-fp16": (small, dict(dtype="float16", **opt)),
             "small-portable-fp32": (small, dict(dtype="float32", flavor="portable"))}
    if not args.int4_only:  # with --int4-only the fp16 graph (141 GB at 70B) is neither written nor timed
        steps["model-opt"] = (model, dict(dtype=args.dtype, **opt))
    if args.int4:  # the 8B twin keeps its token table fp16; as the main model it is quantized to save memory
        steps["model-opt-int4"] = (model, dict(dtype=args.dtype, quantization=Z.int4_spec(
            embedding=args.int4_only), **opt))
    return steps


def prepare(args) -> int:
    """The export steps; the small model's run in a child process beside the 8B ones (the 8B export keeps about
    one core busy, the machine has more), each process with its own status file."""
    work = Path(args.work).resolve()
    (work / "exports").mkdir(parents=True, exist_ok=True)
    log = S.Log(work / "prepare.log")
    steps = _export_steps(args, work)
    child = None
    if args.steps:
        steps = {k: v for k, v in steps.items() if k in args.steps.split(",")}
    else:
        small = [k for k in steps if k.startswith("small-")]
        with open(work / "prepare-small.out", "a") as f:
            child = subprocess.Popen([sys.executable, "-m", "llama3_deploy.benchmarks.gpu", *args.argv,
                                      "--phase", "prepare", "--steps", ",".join(small)],
                                     stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        steps = {k: v for k, v in steps.items() if k not in small}
    status_path = work / f"prepare-status-{'small' if args.steps else 'model'}.json"
    status = {"pid": os.getpid(), "state": "running", "started": _now(), "steps": {},
              "command": _command(args.argv)}
    S.write_json(status_path, status)
    _run_steps(args, work, steps, status, status_path, log)
    status.update(state="waiting", current=None)  # for the small model's child, if it still runs
    S.write_json(status_path, status)
    rc = child.wait() if child is not None else 0
    status.update(state="done", finished=_now(), current=None)
    S.write_json(status_path, status)
    log(f"prepare ({', '.join(steps)}): done")
    extra = set() if args.int4_only else {"model-opt-int4"}  # the twin is extra; with --int4-only it is the model
    failed = [k for k, st in status["steps"].items() if st["state"] == "failed" and k not in extra]
    return 1 if failed or rc else 0


def _run_steps(args, work: Path, steps: dict, status: dict, status_path: Path, log) -> None:
    from llama3_deploy.export.pipeline import export_model

    from .gpu_checks import source_config
    for key, (source, kw) in steps.items():
        dest = work / "exports" / key
        status["current"] = key
        if _same_export(dest, source, kw):
            status["steps"][key] = {"state": "done", "path": str(dest), "cached": True}
            log(f"{key}: already there ({dest})")
            continue
        # checked before each step starts, from the config and the quantization: at 70B the fp16 graph (141 GB)
        # never fits the 64 GB disk, the INT4 one (~40 GB) only when little else is there
        expect = Z.export_bytes(source_config(source), dtype=kw["dtype"], quantization=kw.get("quantization"))
        free, need = _free_bytes(work), Z.disk_needed_bytes(expect)
        if free < need:
            reason = f"{free / 1e9:.1f} GB free disk, ~{need / 1e9:.1f} GB needed (an export of ~{expect / 1e9:.1f} GB)"
            status["steps"][key] = {"state": "skipped", "reason": reason, "expected_bytes": expect}
            log(f"{key}: skipped, {reason}")
            continue
        status["steps"][key] = {"state": "running", "started": _now(), "expected_bytes": expect}
        S.write_json(status_path, status)
        log(f"{key}: exporting {source} {kw} -> {dest} (~{expect / 1e9:.2f} GB)")
        stop = threading.Event()
        threading.Thread(target=_watch, args=(dest, expect, key, log, stop), daemon=True).start()
        t0 = time.perf_counter()
        try:
            export_model(source, dest, validate_export=False, overwrite=True, progress=False, seed=args.seed, **kw)
            secs = round(time.perf_counter() - t0, 1)
            size = (dest / "model.onnx.data").stat().st_size
            status["steps"][key] = {"state": "done", "path": str(dest), "seconds": secs, "bytes": size}
            log(f"{key}: done in {secs} s ({size / 1e9:.2f} GB)")
        except Exception as e:
            status["steps"][key] = {"state": "failed", "error": f"{type(e).__name__}: {e}"[:1000],
                                    "traceback": traceback.format_exc()[-3000:]}
            log(f"{key}: FAILED: {type(e).__name__}: {str(e)[:300]}")
        finally:
            stop.set()
        S.write_json(status_path, status)


def _same_export(dest: Path, source: str, kw: dict) -> bool:
    """A finished export of the same source, dtype and quantization is reused (a rerun on a warm machine)."""
    m = S.read_json(dest / "manifest.json")
    q = kw.get("quantization")
    return bool(m) and m.get("source", {}).get("model") == source and m.get("dtype") == kw["dtype"] and \
        m.get("flavor") == kw["flavor"] and (m.get("quantization") or None) == (q.to_json() if q else None)


def _watch(dest: Path, expect: int, key: str, log, stop: threading.Event) -> None:
    while not stop.wait(20):
        written = 0
        for p in dest.parent.glob(f"*{dest.name}.tmp*/model.onnx.data"):  # the export's temporary directory
            try:
                written += p.stat().st_size
            except OSError:  # renamed into place meanwhile
                pass
        log(f"{key}: {written / 1e9:.2f} of ~{expect / 1e9:.2f} GB written")


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _command(argv: list[str]) -> str:
    return "python3 -m llama3_deploy.benchmarks.gpu " + " ".join(argv)


# --- bench ---------------------------------------------------------------------------------------------
class Bench:
    """Item by item; every result lands in $OUT/gpu-check.json at once, and an error in one item is recorded
    and the next one runs."""

    def __init__(self, args):
        self.args, self.cuda = args, args.device.startswith("cuda")
        self.out, self.work = Path(args.out), Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = S.Log(self.out / "gpu-check-bench.log")
        self.t_end = time.perf_counter() + args.budget_s
        self.doc = {"schema": "llama3-deploy/gpu-check", "schema_version": 1, "complete": False,
                    "title": "", "command": _command(args.argv), "started": _now(), "wall_s": None,
                    "weights": "seeded random weights (not trained) in every ONNX export; PyTorch eager is built "
                               "from the same config with transformers' random init: latency and memory do not "
                               "depend on the values, output quality is not measured",
                    "protocol": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                 "long_prompt_len": args.long_prompt_len, "long_new_tokens": args.long_new_tokens,
                                 "reps": args.reps, "warmup": args.warmup, "seed": args.seed,
                                 "budget_s": args.budget_s, "decoding": "greedy, forced token count (EOS ignored)",
                                 "statistic": "TTFT: median over rounds; TPOT: p50/p90 over every decode step of "
                                              "every round", "timing": "host clock around each call; this runtime "
                                 "synchronizes its outputs each step, PyTorch copies each token to the host"},
                    "source": S.source_digest(), "machine": {}, "versions": {}, "prepare": {}, "floor": None,
                    "int4_only": args.int4_only, "eager": None,
                    "correctness": None, "results": [], "targets": [], "skipped": [], "errors": []}

    def left(self) -> float:
        return self.t_end - time.perf_counter()

    def save(self) -> None:
        self.doc["wall_s"] = round(time.perf_counter() - self.log.t0, 1)
        self.doc["prepare"] = S.prepare_state(self.work)
        S.write_json(self.out / "gpu-check.json", self.doc)

    def item(self, name: str, fn, *, need_s: float = 0.0):
        """Run one item unless the budget is short; record an error and go on."""
        if need_s and self.left() < need_s:
            self.skip(name, f"budget: {self.left():.0f} s left, ~{need_s:.0f} s needed")
            return None
        try:
            return fn()
        except Exception as e:
            self.log(f"ERROR in {name}: {type(e).__name__}: {str(e)[:500]}")
            self.doc["errors"].append({"item": name, "error": f"{type(e).__name__}: {e}"[:2000],
                                       "traceback": traceback.format_exc()[-4000:]})
            return None
        finally:
            self.save()

    def skip(self, name: str, reason: str) -> None:
        self.log(f"skipped {name}: {reason}")
        self.doc["skipped"].append({"item": name, "reason": reason})
        self.save()

    def wait_for(self, keys, deadline_s: float) -> dict[str, Path]:
        """The exports among `keys` that the prepare phase finished, waiting while it still works on them."""
        t_stop, last = time.perf_counter() + max(deadline_s, 0), 0.0
        while True:
            st = S.prepare_state(self.work)
            steps = st["steps"]
            have = {k: Path(steps[k]["path"]) for k in keys if steps.get(k, {}).get("state") == "done"}
            have.update({k: self.work / "exports" / k for k in keys if k not in have
                         and (self.work / "exports" / k / "manifest.json").is_file()})
            pending = [k for k in keys if k not in have and steps.get(k, {}).get("state") not in ("failed", "skipped")]
            running = st["state"] == "running"
            if not pending or not running or time.perf_counter() > t_stop:
                for k in pending:
                    self.log(f"{k}: not ready ({'prepare not running' if not running else 'waited long enough'})")
                return have
            if time.perf_counter() - last > 30:
                tail = (self.work / "prepare.log").read_text().splitlines()[-1:] if (
                    self.work / "prepare.log").is_file() else []
                self.log(f"waiting for {', '.join(pending)} ({self.left():.0f} s budget left): {' '.join(tail)[:160]}")
                last = time.perf_counter()
            time.sleep(2)


def bench(args) -> int:
    b = Bench(args)
    log, doc = b.log, b.doc
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's TERM still writes the report
    try:
        if b.cuda:
            import torch  # before onnxruntime: its CUDA/cuDNN libraries serve ORT's CUDA build too
            doc["ort_install"] = S.install_staged_wheel(Path(args.ort_parts).resolve(),
                                                        Path(args.ort_parts).resolve() / "site", log)
            log(f"onnxruntime install: {doc['ort_install'].get('installed')}")
            if not torch.cuda.is_available():
                raise SystemExit("torch sees no CUDA device")
            import onnxruntime as ort
            if "CUDAExecutionProvider" in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
                try:  # torch, imported first, has loaded the CUDA 13 / cuDNN libraries this build needs
                    ort.preload_dlls()
                except Exception as e:
                    log(f"onnxruntime.preload_dlls: {type(e).__name__}: {e}")
        doc["versions"], doc["machine"] = S.versions(), S.machine(args.device)
        log(f"versions: {doc['versions']}")
        log(f"machine: {doc['machine']}")
        ort_ok = not b.cuda or "CUDAExecutionProvider" in doc["versions"]["onnxruntime providers"]
        if not ort_ok:
            b.skip("this runtime on CUDA", "onnxruntime has no CUDAExecutionProvider (staged wheel not installed?)")
        from .gpu_bench import run_items
        run_items(b, ort_ok)
    except Exception as e:  # recorded; the report below still gets written and printed
        log(f"ERROR: {type(e).__name__}: {str(e)[:500]}")
        doc["errors"].append({"item": "bench", "error": f"{type(e).__name__}: {e}"[:2000],
                              "traceback": traceback.format_exc()[-4000:]})
    finally:
        finish(b)
        signal.signal(signal.SIGTERM, previous)
    return 0 if doc["complete"] and not doc["errors"] else 1


def finish(b: Bench) -> None:
    from . import gpu_report as R
    doc = b.doc
    doc["complete"] = R.complete(doc)
    try:
        doc["targets"] = R.targets(doc)
    except Exception as e:
        doc["errors"].append({"item": "targets", "error": f"{type(e).__name__}: {e}"})
    b.save()
    (b.out / "gpu-check.md").write_text(R.markdown(doc))
    try:
        R.plot(doc, b.out / "gpu-check.png")
    except Exception as e:
        b.log(f"no plot: {type(e).__name__}: {e}")
    plog = b.work / "prepare.log"
    if plog.is_file():
        (b.out / "gpu-check-prepare.log").write_bytes(plog.read_bytes()[-(4 << 20):])
    R.print_table(doc)
    b.log(f"done in {time.perf_counter() - b.log.t0:.0f} s: {sorted(p.name for p in b.out.iterdir())}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.phase == "prepare":
        return prepare(args)
    rc = 0
    if args.phase == "all":
        # On CUDA the preparation runs in a child: it imports the CPU onnxruntime, and the bench must import the
        # CUDA build first. On the CPU (tests) both share this process.
        rc = (subprocess.run([sys.executable, "-m", "llama3_deploy.benchmarks.gpu", *argv, "--phase", "prepare"]
                             ).returncode if args.device.startswith("cuda") else prepare(args))
        gc.collect()
    return bench(args) or rc


if __name__ == "__main__":
    sys.exit(main())
