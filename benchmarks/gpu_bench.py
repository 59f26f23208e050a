"""The bench phase's items in order of value (see benchmarks/gpu.py): correctness, the floor, the model at batch 1
on this runtime (CUDA graphs on and off) and PyTorch eager, then batch 4 and 8 and INT4 while the budget lasts;
with --int4-only the INT4 export is the model, and PyTorch eager runs only where its fp16 weights fit."""
from __future__ import annotations

import gc
import time
from pathlib import Path

from . import gpu_setup as S
from .gpu_checks import (DeviceMemory, OrtEngine, TorchEager, correctness, make_prompts, measure_floor,
                         model_source, row_floor, source_config, timed)
from .gpu_sizes import device_memory_bytes, eager_plan, export_bytes, int4_spec, weight_bytes


def _free() -> None:
    """Release what the caller dropped: ORT sessions and their device buffers, torch's cached blocks."""
    gc.collect()
    import sys
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


def _eager_ratios(doc: dict) -> None:
    eager = {(r["batch"], r["prompt_len"]): r for r in doc["results"] if r["engine"] == "torch-eager"}
    for r in doc["results"]:
        e = eager.get((r["batch"], r["prompt_len"]))
        if e and r.get("tpot_ms") and e.get("tpot_ms"):
            r["ratio"]["tpot_to_eager"] = r["tpot_ms"]["p50"] / e["tpot_ms"]["p50"]
            r["ratio"]["ttft_to_eager"] = r["ttft_ms"] / e["ttft_ms"]


class Cells:
    """Loads engines and times cells, each a row in doc["results"] with its floor and device memory."""

    def __init__(self, b, config, floor: dict, label: str = "model"):
        self.b, self.config, self.label = b, config, label
        self.bw, self.mm = floor["bandwidth"]["bytes_per_s"], floor["matmul"]["flops_per_s"]
        self.mem = DeviceMemory(b.args.device)
        self.load_est = 90.0 if b.cuda else 10.0
        self.cell_est: dict[str, float] = {}
        self.kv_itemsize = 4 if b.args.dtype == "float32" else 2

    def load(self, name: str, make, *, scale: float = 1.0):
        b = self.b
        if b.left() < self.load_est * scale + 20:
            b.skip(f"{self.label} {name}",
                   f"budget: {b.left():.0f} s left, loading takes ~{self.load_est * scale:.0f} s")
            return None

        def go():
            torch_peak = self.b.cuda and name == "torch-eager"
            if torch_peak:
                import torch
                torch.cuda.reset_peak_memory_stats()
            base = self.mem.used()
            eng = make()
            eng.name, eng.base, eng.peak, eng.torch_peak = name, base, 0, torch_peak
            if name.startswith("ort"):
                self.load_est = max(eng.load_s, 5.0)
            b.log(f"{name}: loaded in {eng.load_s:.1f} s")
            return eng
        return b.item(f"{self.label} {name} load", go)

    def cell(self, eng, export: Path | None, model: str, dtype: str, batch: int, prompt_len: int,
             new_tokens: int, *, item: str) -> None:
        b, args = self.b, self.b.args
        prompt_len = min(prompt_len, self.config.max_position_embeddings - new_tokens)
        need = self.cell_est.get(eng.name, 30.0 if b.cuda else 5.0)

        def go():
            t0 = time.perf_counter()
            prompts = make_prompts(batch, prompt_len, self.config.vocab_size, seed=args.seed + batch)
            s = timed(eng, prompts, new_tokens, reps=args.reps, warmup=args.warmup)
            used = self.mem.used()
            if used is not None:
                eng.peak = max(eng.peak, used - eng.base)
            peak, method = (eng.peak or None), self.mem.method
            if eng.torch_peak:
                import torch
                peak = torch.cuda.max_memory_allocated()
                method = "torch.cuda.max_memory_allocated since the model was built (tensors; cache reserve excluded)"
            fl = row_floor(self.config, export, batch, prompt_len, new_tokens, self.bw, self.mm, self.kv_itemsize)
            row = {"engine": eng.name, "model": model, "dtype": dtype, "batch": batch, "prompt_len": prompt_len,
                   "new_tokens": new_tokens, **s, "floor": fl,
                   "ratio": {"tpot_to_floor": s["tpot_ms"]["p50"] / fl["tpot_floor_ms"] if s["tpot_ms"] else None,
                             "ttft_to_floor": s["ttft_ms"] / fl["ttft_floor_ms"]},
                   "load_s": round(eng.load_s, 1), "peak_device_bytes": peak, "peak_method": method,
                   "export": str(export) if export else None, "cell_wall_s": round(time.perf_counter() - t0, 1)}
            b.doc["results"].append(row)
            _eager_ratios(b.doc)
            self.cell_est[eng.name] = 1.3 * row["cell_wall_s"] * (1 + batch / 16)
            t = s["tpot_ms"] or {}
            b.log(f"{eng.name} {model} B={batch} prompt {prompt_len} new {new_tokens}: TTFT {s['ttft_ms']:.1f} ms, "
                  f"TPOT p50 {t.get('p50', float('nan')):.2f} / p90 {t.get('p90', float('nan')):.2f} ms "
                  f"(floor {fl['tpot_floor_ms']:.2f} ms), peak {'-' if peak is None else f'{peak / 2**30:.2f}'} GiB, "
                  f"{row['cell_wall_s']} s")
        b.item(f"{item} {eng.name} B={batch} prompt {prompt_len}", go, need_s=need)


def run_items(b, ort_ok: bool) -> None:
    args, log, doc = b.args, b.log, b.doc
    device = args.device
    # 1. correctness on the small model (it needs nothing of the big export, which may still be running)
    if ort_ok:
        small = b.wait_for(["small-opt-fp32", "small-opt-fp16"], deadline_s=min(180.0, b.left() / 3))
        small.update(b.wait_for(["small-portable-fp32"], deadline_s=min(45.0, b.left() / 6)))
        if small:
            doc["correctness"] = b.item("1 correctness", lambda: correctness(small, device, log=log))
        else:
            b.skip("1 correctness", "no small-model export (see gpu-check-prepare.log)")
    # 2. the floor, measured in this call, then the model at batch 1
    floor = doc["floor"] = b.item("2 floor", lambda: measure_floor(device))
    if not floor:
        return
    log(f"floor: copy {floor['bandwidth']['bytes_per_s'] / 1e9:.0f} GB/s, matmul "
        f"{floor['matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s")
    config = source_config(model_source(args.model, b.work))
    model = args.model.split(":")[-1].split("/")[-1]
    int4_only = args.int4_only
    eager = doc["eager"] = eager_plan(config, device_memory_bytes(device), dtype=args.dtype,
                                      where="GPU" if b.cuda else "host memory")
    versus = " vs PyTorch eager" if eager["run"] else "; PyTorch eager not run (its weights do not fit)"
    what = f"INT4 weights, {args.dtype}" if int4_only else args.dtype
    doc["title"] = f"GPU check: {model} ({what}) on {doc['machine'].get('gpu') or device}, this runtime{versus}"
    quant = int4_spec(embedding=True) if int4_only else None
    doc["model"] = {"name": model, "source": args.model, "parameters": config.num_parameters(),
                    "fp16_weight_bytes": weight_bytes(config, dtype="float16"),
                    "export_bytes_estimate": export_bytes(config, dtype=args.dtype, quantization=quant),
                    "config": config.to_hf_dict()}
    key = "model-opt-int4" if int4_only else "model-opt"
    est_ort = 120.0 if b.cuda else 10.0
    main = b.wait_for([key], deadline_s=b.left() - 2 * est_ort).get(key)
    if main is None:
        b.skip(f"{model} this runtime", f"the {key} export is not there (see gpu-check-prepare.log)")
    cells = Cells(b, config, floor, label=model)
    P, N, L, NL = args.prompt_len, args.new_tokens, args.long_prompt_len, args.long_new_tokens
    kept = {}
    with S.pause_prepare(b.work, log):
        plan = []  # (engine name, how to make it, the export its floor counts, the dtype the table shows)
        if ort_ok and main is not None and int4_only:  # one load: at 70B it is the costliest step of the call
            plan.append(("ort-graph-int4" if b.cuda else "ort-int4",
                         lambda: OrtEngine(main, device=device, cuda_graph=b.cuda), main, f"int4/{args.dtype}"))
        elif ort_ok and main is not None:
            if b.cuda:
                plan.append(("ort-graph", lambda: OrtEngine(main, device=device, cuda_graph=True), main, args.dtype))
            plan.append(("ort", lambda: OrtEngine(main, device=device, cuda_graph=False), main, args.dtype))
        if eager["run"]:  # its floor: the fp16 export's bytes, or with --int4-only the config's fp16 weights
            plan.append(("torch-eager", lambda: TorchEager(config, dtype=args.dtype, device=device, seed=args.seed),
                         None if int4_only else main, args.dtype))
        else:
            b.skip("PyTorch eager", eager["reason"])
        for name, make, export, dtype in plan:
            eng = cells.load(name, make, scale=0.2 if name == "torch-eager" else 1.0)
            if eng is None:
                continue
            for p, n in ((P, N), (L, NL)):
                cells.cell(eng, export, model, dtype, 1, p, n, item="2")
            if name == "ort" and b.cuda:
                eng = None  # only the CUDA-graph variant goes on to item 3
                _free()
            else:
                kept[name] = (eng, export, dtype)
            eng = None
        # 3. batch 4 and 8 while the budget lasts
        for batch in [int(x) for x in args.batches.split(",") if x.strip()]:
            for eng, export, dtype in kept.values():
                cells.cell(eng, export, model, dtype, batch, P, N, item="3")
        eng = None
    kept.clear()
    _free()
    # 3. the INT4 twin of the fp16 model, if the prepare phase got to it (with --int4-only it was the model)
    if int4_only or not args.int4 or not ort_ok:
        return
    q = b.wait_for(["model-opt-int4"], deadline_s=b.left() - 0.6 * cells.load_est - 60).get("model-opt-int4")
    if q is None:
        b.skip("3 INT4", "the INT4 export is not there in time (see gpu-check-prepare.log)")
        return
    name = "ort-graph-int4" if b.cuda else "ort-int4"
    with S.pause_prepare(b.work, log):
        eng = cells.load(name, lambda: OrtEngine(q, device=device, cuda_graph=b.cuda), scale=0.6)
        if eng is not None:
            for p, n in ((P, N), (L, NL)):
                cells.cell(eng, q, model, f"int4/{args.dtype}", 1, p, n, item="3")
        eng = None
        _free()
