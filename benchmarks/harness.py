"""The benchmark matrix: engines x (prompt length, batch) cells, interleaved, repeated, summarised.

Protocol, per cell:
- every engine runs in its own worker process (benchmarks/worker.py, under the engine's own Python),
  started fresh for the cell (scope "cell"; the engines load side by side, untimed), so its peak RSS is
  its own and belongs to this cell;
- the same seeded random prompt ids (no special tokens, one length for every row) go to every engine;
- greedy decoding with a forced token count (EOS ignored), so every engine does the same work;
- `warmup` untimed runs per engine, then `reps` timed rounds; a round runs every engine once, the
  order rotated by one each round (A B C, B C A, C A B), so machine drift hits all alike;
- each figure is the median over the rounds of that round's value (TTFT; p50/p90/p99 of the round's
  decode steps; tokens per second = batch x new tokens / (TTFT + all steps)).
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PAUSE_S = 0.3  # idle gap between runs so the previous engine's spinning threads go quiet


@dataclasses.dataclass
class EngineSpec:
    """How to start one engine: its kind, artifact path, device, precision, and the Python to run it."""

    kind: str
    path: str
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0
    label: str | None = None
    python: str = sys.executable
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.label or f"{self.kind}:{self.dtype}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Cell:
    prompt_len: int
    batch: int

    def __str__(self) -> str:
        return f"{self.prompt_len}x{self.batch}"


def parse_cells(text: str) -> list[Cell]:
    """'128x1,512x1,2048x1,128x4' -> cells (prompt length x batch)."""
    cells = []
    for part in text.split(","):
        p, _, b = part.strip().lower().partition("x")
        cells.append(Cell(int(p), int(b or 1)))
    return cells


def make_prompts(batch: int, length: int, vocab: int, *, seed: int, avoid: set[int] = frozenset()) -> list[list[int]]:
    """Seeded random prompt ids, one length for every row, never an id in `avoid` (BOS/EOS/pad)."""
    rng = np.random.default_rng([seed, batch, length])
    ids = rng.integers(0, vocab, size=(batch, length))
    allowed = np.setdiff1d(np.arange(min(vocab, 1 << 17)), np.fromiter(avoid, dtype=np.int64))
    bad = np.isin(ids, list(avoid)) if avoid else np.zeros_like(ids, bool)
    ids[bad] = allowed[rng.integers(0, allowed.size, size=int(bad.sum()))]
    return ids.tolist()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


class WorkerError(RuntimeError):
    pass


class Worker:
    """An engine in a child process; `run` sends one generation and returns the worker's reply."""

    def __init__(self, spec: EngineSpec, log_path: Path, *, timeout_s: float = 1800):
        self.spec, self.timeout_s = spec, timeout_s
        # The worker imports the installed package (an interpreter of another environment has it installed too).
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([spec.python, "-m", "llama3_deploy.benchmarks.worker", json.dumps(spec.to_json())],
                                     cwd=str(REPO), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log)
        self.info: dict = {}

    def wait_ready(self) -> "Worker":
        """Wait for the engine to load; raises WorkerError with the worker's reason if it cannot."""
        self.info = self._recv()
        if self.info.get("event") != "ready":
            self.close()
            raise WorkerError(self.info.get("error", "worker did not start"))
        return self

    def _recv(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            code = self.proc.poll()
            return {"event": "error", "error": f"worker exited (code {code}) or timed out; see its log"}
        return json.loads(line)

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        self.proc.stdin.write((json.dumps({"op": "run", "prompts": prompts, "new_tokens": new_tokens}) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._recv()
        if reply.get("event") != "result":
            raise WorkerError(reply.get("error", "no result"))
        return reply

    def close(self) -> dict:
        bye: dict = {}
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                bye = self._recv()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return bye


def summarize_round(run: dict, batch: int, new_tokens: int) -> dict:
    """One timed run's figures."""
    steps = run["step_ms"]
    total_ms = run["ttft_ms"] + sum(steps)
    mean = statistics.fmean(steps) if steps else None
    return {"ttft_ms": run["ttft_ms"], "tpot_p50_ms": percentile(steps, 50), "tpot_p90_ms": percentile(steps, 90),
            "tpot_p99_ms": percentile(steps, 99), "tpot_mean_ms": mean,
            "tokens_per_s": batch * new_tokens / (total_ms / 1e3),
            "decode_tokens_per_s": batch / (mean / 1e3) if mean else None}


def summarize(runs: list[dict], batch: int, new_tokens: int) -> dict:
    """The median over rounds of each round's figures."""
    rounds = [summarize_round(r, batch, new_tokens) for r in runs]
    med = {k: statistics.median(r[k] for r in rounds) if all(r[k] is not None for r in rounds) else None
           for k in rounds[0]}
    return {"ttft_ms": med["ttft_ms"],
            "tpot_ms": {"p50": med["tpot_p50_ms"], "p90": med["tpot_p90_ms"], "p99": med["tpot_p99_ms"],
                        "mean": med["tpot_mean_ms"]},
            "tokens_per_s": med["tokens_per_s"], "decode_tokens_per_s": med["decode_tokens_per_s"],
            "rounds": rounds}


def start_workers(specs: list[EngineSpec], log_dir: Path, *, tag: str = "", log=print) -> tuple[dict, dict]:
    """Start one worker per engine; returns ({key: Worker}, {key: why it could not start})."""
    log_dir.mkdir(parents=True, exist_ok=True)
    workers, errors = {}, {}
    started = {spec.key: Worker(spec, log_dir / f"{_slug(spec.key)}.log") for spec in specs}  # load in parallel
    for key, w in started.items():
        try:
            workers[key] = w.wait_ready()
            log(f"  {tag}{key}: loaded in {w.info['load_s']:.1f} s")
        except WorkerError as e:
            errors[key] = f"load failed: {e}"
            log(f"  {tag}{key}: cannot start: {e}")
    return workers, errors


def run_cell(workers: dict[str, Worker], cell: Cell, *, new_tokens: int, reps: int, warmup: int, vocab: int,
             seed: int, avoid: set[int], log=print) -> tuple[dict, dict]:
    """Warm up, then `reps` interleaved rounds on running workers; returns ({key: data}, {key: error})."""
    prompts = make_prompts(cell.batch, cell.prompt_len, vocab, seed=seed, avoid=avoid)
    errors: dict[str, str] = {}
    data = {k: {"info": w.info, "warmup": [], "runs": []} for k, w in workers.items()}

    def one(key: str, bucket: str) -> None:
        try:
            t0 = time.perf_counter()
            r = workers[key].run(prompts, new_tokens)
            r["wall_s"] = time.perf_counter() - t0
            data[key][bucket].append(r)
        except WorkerError as e:
            errors[key] = f"run failed: {e}"
            log(f"  [{cell}] {key}: {errors[key]}")
        time.sleep(PAUSE_S)

    for key in workers:
        for _ in range(warmup):
            if key not in errors:
                one(key, "warmup")
    keys = [k for k in workers if k not in errors]
    for rep in range(reps):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)] if keys else []
        for key in order:
            if key not in errors:
                one(key, "runs")
        log(f"  [{cell}] round {rep + 1}/{reps}: " + ", ".join(
            f"{k} ttft {data[k]['runs'][-1]['ttft_ms']:.0f} ms tpot {statistics.median(data[k]['runs'][-1]['step_ms'] or [0]):.1f} ms"
            for k in order if k not in errors and data[k]["runs"]))
    return {k: v for k, v in data.items() if k not in errors}, errors


def _loadavg() -> str | None:
    """The 1/5/15-minute load averages: how busy the machine was around a cell (other users included)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def cell_result(spec: EngineSpec, cell: Cell, collected: dict, *, new_tokens: int, floor: dict | None) -> dict:
    """Everything the report needs about one engine in one cell, raw timings included."""
    runs = collected["runs"]
    s = summarize(runs, cell.batch, new_tokens)
    peak_run = max(r["peak_rss_bytes"] for r in runs + collected["warmup"])
    lifetime = collected.get("bye", {}).get("peak_rss_lifetime_bytes") or max(
        peak_run, collected["info"].get("peak_rss_load_bytes") or 0)
    dev = [r.get("device_memory", {}).get("peak_device_bytes") for r in runs + collected["warmup"]]
    dev = [d for d in dev if d is not None]
    out = {
        "engine": collected["info"]["name"], "key": spec.key, "kind": spec.kind,
        "version": collected["info"]["version"], "dtype": collected["info"].get("dtype") or spec.dtype,
        "device": spec.device, "prompt_len": cell.prompt_len, "batch": cell.batch, "new_tokens": new_tokens,
        "reps": len(runs), "ttft_ms": s["ttft_ms"], "tpot_ms": s["tpot_ms"], "tokens_per_s": s["tokens_per_s"],
        "decode_tokens_per_s": s["decode_tokens_per_s"],
        "peak_rss_bytes": lifetime, "peak_rss_generate_bytes": peak_run,
        "rss_after_load_bytes": collected["info"].get("rss_after_load_bytes"),
        "peak_device_bytes": max(dev) if dev else None,
        "load_s": collected["info"]["load_s"], "rounds": s["rounds"],
        "raw": {"runs": [_raw(r) for r in runs], "warmup": [_raw(r) for r in collected["warmup"]]},
        "tokens_first_row": runs[-1]["tokens"][0],
    }
    if floor is not None:
        attach_floor(out, floor)
    return out


def attach_floor(result: dict, floor: dict) -> None:
    """Put a cell's floor beside its result, with the result's ratio to it."""
    result["floor"] = floor
    result["ratio_to_floor"] = {"ttft": result["ttft_ms"] / floor["ttft_floor_ms"],
                                "tpot_p50": result["tpot_ms"]["p50"] / floor["tpot_floor_ms"]}


def _raw(r: dict) -> dict:
    return {"ttft_ms": round(r["ttft_ms"], 4), "step_ms": [round(x, 4) for x in r["step_ms"]],
            "peak_rss_bytes": r["peak_rss_bytes"], "wall_s": round(r["wall_s"], 3),
            **({"device_memory": r["device_memory"]} if "device_memory" in r else {})}


def add_pytorch_ratios(results: list[dict], reference_kind: str = "torch-eager") -> None:
    """Each result's TTFT, TPOT p50 and peak RSS as a ratio to PyTorch eager's in the same cell, and
    the share of generated tokens that equal PyTorch's (a check that every engine runs the same model)."""
    refs = {(r["prompt_len"], r["batch"]): r for r in results if r["kind"] == reference_kind}
    for r in results:
        ref = refs.get((r["prompt_len"], r["batch"]))
        if ref is None:
            r["ratio_to_pytorch"] = None
            continue
        r["ratio_to_pytorch"] = {"ttft": r["ttft_ms"] / ref["ttft_ms"], "tpot_p50": r["tpot_ms"]["p50"] / ref["tpot_ms"]["p50"],
                                 "peak_rss": r["peak_rss_bytes"] / ref["peak_rss_bytes"]}
        # Paired by round (engines share each round, so they share its machine noise): in how many rounds
        # this engine was faster than PyTorch.
        pairs = list(zip(r.get("rounds") or [], ref.get("rounds") or [])) if r is not ref else []
        r["rounds_faster_than_pytorch"] = {
            "ttft": sum(a["ttft_ms"] < b["ttft_ms"] for a, b in pairs),
            "tpot_p50": sum(a["tpot_p50_ms"] is not None and b["tpot_p50_ms"] is not None
                            and a["tpot_p50_ms"] < b["tpot_p50_ms"] for a, b in pairs),
            "rounds": len(pairs)}
        a, b = r["tokens_first_row"], ref["tokens_first_row"]
        r["tokens_equal_pytorch"] = sum(x == y for x, y in zip(a, b)) / max(len(b), 1)


def run_matrix(specs: list[EngineSpec], cells: list[Cell], *, config, new_tokens: int, reps: int, warmup: int,
               seed: int, log_dir: Path, scope: str = "cell", floor_for=None, on_cell=None,
               log=print) -> tuple[list[dict], list[dict]]:
    """All cells in order; returns (results, errors). `floor_for(spec, cell)` gives each result's floor.

    scope "cell": fresh workers per cell (peak RSS belongs to the cell); "run": one worker per engine for
    all cells (loads and compiles once; memory figures are then the peak so far in the run).
    `on_cell(results, errors)` is called after each cell (e.g. to save partial results).
    """
    if scope not in ("cell", "run"):
        raise ValueError("scope must be 'cell' or 'run'")
    avoid = {i for i in (config.bos_token_id, *config.eos_token_ids) if i is not None}
    results, errors = [], []
    workers, start_errs = start_workers(specs, log_dir / "all", log=log) if scope == "run" else ({}, {})
    seen: dict[str, list[dict]] = {}  # every run so far per engine (run scope: peaks so far)
    try:
        for cell in cells:
            t0 = time.perf_counter()
            load_start = _loadavg()
            log(f"cell prompt {cell.prompt_len} x batch {cell.batch}: {len(specs)} engines, "
                f"{warmup} warm-up + {reps} rounds")
            if scope == "cell":
                workers, start_errs = start_workers(specs, log_dir / str(cell), tag=f"[{cell}] ", log=log)
            data, errs = run_cell(workers, cell, new_tokens=new_tokens, reps=reps, warmup=warmup,
                                  vocab=config.vocab_size, seed=seed, avoid=avoid, log=log)
            errs = {**start_errs, **errs}
            if scope == "run":
                start_errs = errs  # an engine that failed stays failed for the cells after
            for key in errs:
                if key in workers and scope == "run":
                    workers.pop(key).close()
            if scope == "cell":
                for key, w in workers.items():
                    if key in data:
                        data[key]["bye"] = w.close()
                    else:
                        w.close()
            for spec in specs:
                d = data.get(spec.key)
                if d and d["runs"] and spec.key not in errs:
                    history = seen.setdefault(spec.key, [])
                    history += d["warmup"] + d["runs"]
                    if scope == "run":
                        d["bye"] = {"peak_rss_lifetime_bytes": max([d["info"].get("peak_rss_load_bytes") or 0]
                                                                   + [r["peak_rss_bytes"] for r in history])}
                    results.append(cell_result(spec, cell, d, new_tokens=new_tokens,
                                               floor=floor_for(spec, cell) if floor_for else None))
                    results[-1]["loadavg"] = {"cell_start": load_start, "cell_end": _loadavg()}
                elif spec.key in errs:
                    errors.append({"key": spec.key, "kind": spec.kind, "prompt_len": cell.prompt_len,
                                   "batch": cell.batch, "error": errs[spec.key]})
            log(f"cell {cell} done in {time.perf_counter() - t0:.0f} s")
            if on_cell is not None:
                on_cell(results, errors)
    finally:
        if scope == "run":
            for w in workers.values():
                w.close()
    add_pytorch_ratios(results)
    return results, errors
