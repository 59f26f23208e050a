"""The GPU check's report: targets, the Markdown table, the PNG and the table printed last."""
from __future__ import annotations

from pathlib import Path

LABELS = {
    "ort-graph": "this runtime, CUDA graphs",
    "ort": "this runtime, no CUDA graphs",
    "torch-eager": "PyTorch eager",
    "ort-graph-int4": "this runtime, INT4 weights, CUDA graphs",
    "ort-int4": "this runtime, INT4 weights",
}


def find(doc: dict, engine: str, batch: int = 1, prompt_len: int | None = None) -> dict | None:
    prompt_len = doc["protocol"]["prompt_len"] if prompt_len is None else prompt_len
    return next((r for r in doc["results"] if r["engine"] == engine and r["batch"] == batch
                 and r["prompt_len"] == prompt_len), None)


def ours(doc: dict, int4: bool | None = None) -> str:
    """The variant the targets judge: with CUDA graphs where it ran, else without (the CPU); by default the INT4
    export with --int4-only (there it is the model), else the fp16 one."""
    int4 = doc.get("int4_only", False) if int4 is None else int4
    suffix = "-int4" if int4 else ""
    return f"ort-graph{suffix}" if find(doc, f"ort-graph{suffix}") else f"ort{suffix}"


def eager_skipped(doc: dict) -> str | None:
    """Why PyTorch eager did not run (its fp16 weights do not fit the device), or None where it was planned."""
    plan = doc.get("eager") or {}
    return None if plan.get("run", True) else plan.get("reason") or "PyTorch eager did not fit"


def complete(doc: dict) -> bool:
    """Items 1 and 2 ran: correctness, and batch 1 of this runtime's model and of PyTorch, unless PyTorch was
    skipped because its weights do not fit (then there is nothing to run); item 3 is extra."""
    return bool(doc["correctness"]) and bool(doc["results"]) and find(doc, ours(doc)) is not None and \
        (find(doc, "torch-eager") is not None or eager_skipped(doc) is not None)


def targets(doc: dict) -> list[dict]:
    """The issue's targets at batch 1 for the model (on the CPU the same ratios, judged alike): fp16 within 1.25x
    its floor, INT4 (the twin, or the model with --int4-only) within 2x its own; against PyTorch eager, noted
    with the reason where that did not run."""
    long, int4_only, why = doc["protocol"]["long_prompt_len"], doc.get("int4_only", False), eager_skipped(doc)
    me, ref = find(doc, ours(doc)), find(doc, "torch-eager")
    me_long, ref_long = find(doc, ours(doc), prompt_len=long), find(doc, "torch-eager", prompt_len=long)
    q = find(doc, ours(doc, int4=True))
    out = []

    def add(name, value, limit, ok_if, note=None):
        ok = None if value is None else bool(ok_if(value, limit))
        out.append({"target": name, "value": None if value is None else round(value, 3), "limit": limit, "ok": ok,
                     **({"note": note} if note and value is None else {})})

    tpot = lambda r: r["tpot_ms"]["p50"] if r and r.get("tpot_ms") else None
    eager_note = f"not run: {why}" if why else None
    if not int4_only:
        add(f"{ours(doc)} TPOT p50 / floor", tpot(me) / me["floor"]["tpot_floor_ms"] if tpot(me) else None,
            1.25, lambda v, l: v <= l)
    else:
        add(f"{ours(doc)} TPOT p50 / its own floor", tpot(me) / me["floor"]["tpot_floor_ms"] if tpot(me) else None,
            2.0, lambda v, l: v <= l)
    add(f"{ours(doc)} TPOT p50 / PyTorch eager", tpot(me) / tpot(ref) if tpot(me) and tpot(ref) else None,
        0.8, lambda v, l: v <= l, eager_note)
    add(f"{ours(doc)} TTFT at {long} / PyTorch eager",
        me_long["ttft_ms"] / ref_long["ttft_ms"] if me_long and ref_long else None, 1.0, lambda v, l: v < l,
        eager_note)
    if not int4_only:
        add(f"{ours(doc, True)} TPOT p50 / its own floor",
            tpot(q) / q["floor"]["tpot_floor_ms"] if tpot(q) else None, 2.0, lambda v, l: v <= l)
    return out


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def table_lines(doc: dict) -> list[str]:
    head = ("| engine | model | B | prompt | new | TTFT ms | TPOT p50 | TPOT p90 | TPOT floor | x floor "
            "| x eager | peak dev GiB |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in doc["results"]:
        t = r.get("tpot_ms") or {}
        gib = r.get("peak_device_bytes")
        lines.append(f"| {LABELS.get(r['engine'], r['engine'])} | {r['model']} {r['dtype']} | {r['batch']} | "
                     f"{r['prompt_len']} | {r['new_tokens']} | {_f(r['ttft_ms'], '{:.1f}')} | {_f(t.get('p50'))} | "
                     f"{_f(t.get('p90'))} | {_f(r['floor']['tpot_floor_ms'])} | "
                     f"{_f((r.get('ratio') or {}).get('tpot_to_floor'))} | "
                     f"{_f((r.get('ratio') or {}).get('tpot_to_eager'))} | "
                     f"{_f(gib / 2**30 if gib else None)} |")
    return lines


def markdown(doc: dict) -> str:
    fl = doc.get("floor") or {}
    bw = (fl.get("bandwidth") or {}).get("bytes_per_s")
    lines = [f"# {doc['title']}", "", f"Device: {doc['machine'].get('gpu') or doc['machine'].get('cpu')}; "
             f"command: `{doc['command']}`; {'complete' if doc['complete'] else 'PARTIAL (the run did not finish)'}.",
             "", doc["weights"], "",
             f"Floor: copy bandwidth {_f(bw / 1e12 if bw else None, '{:.2f}')} TB/s measured in this call "
             "(read + write); a decode step reads every weight once plus the KV cache.", "",
             *([f"Not run: {eager_skipped(doc)}. No ratios to PyTorch in this report.", ""]
               if eager_skipped(doc) else []),
             *table_lines(doc), "", "## Targets", "", "| target | value | limit | ok |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {_f(t['value'], '{:.3f}')} | {t['limit']} | "
              f"{'not run (see above)' if t.get('note') else t['ok']} |" for t in doc["targets"]]
    c = doc.get("correctness") or {}
    lines += ["", "## Correctness (small model)", "", f"all ok: {c.get('ok')}", ""]
    lines += [f"- {k}: ok={v.get('ok')}" for k, v in c.items() if isinstance(v, dict)]
    if doc["skipped"] or doc["errors"]:
        lines += ["", "## Skipped and errors", ""]
        lines += [f"- skipped {s['item']}: {s['reason']}" for s in doc["skipped"]]
        lines += [f"- error in {e['item']}: {e['error']}" for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> bool:
    """TPOT p50 per engine and batch beside its floor; TTFT at both prompt lengths. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    p = doc["protocol"]["prompt_len"]
    rows = [r for r in doc["results"] if r["prompt_len"] == p and r.get("tpot_ms")]
    if not rows:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [f"{r['engine']}\nB={r['batch']}" for r in rows]
    x = range(len(rows))
    a.bar(x, [r["tpot_ms"]["p50"] for r in rows], color="tab:blue", label="TPOT p50")
    a.scatter(x, [r["floor"]["tpot_floor_ms"] for r in rows], color="black", marker="_", s=400, label="floor")
    a.set_xticks(list(x), names, fontsize=7)
    a.set_ylabel("ms per output token")
    a.legend()
    a.set_title("time per output token")
    long = doc["protocol"]["long_prompt_len"]
    engines = [e for e in LABELS if find(doc, e)]
    for i, plen in enumerate((p, long)):
        vals = [(find(doc, e, prompt_len=plen) or {}).get("ttft_ms") or 0 for e in engines]
        b.bar([j + 0.4 * i for j in range(len(engines))], vals, width=0.4, label=f"prompt {plen}")
    b.set_xticks([j + 0.2 for j in range(len(engines))], engines, fontsize=7)
    b.set_ylabel("ms")
    b.set_yscale("log")
    b.legend()
    b.set_title("time to first token (batch 1)")
    fig.suptitle(doc["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def print_table(doc: dict) -> None:
    print("\n".join(["", doc["title"], *table_lines(doc), ""]))
    if eager_skipped(doc):
        print(f"  not run: {eager_skipped(doc)}")
    for t in doc["targets"]:
        print(f"  target {t['target']}: {_f(t['value'], '{:.3f}')} (limit {t['limit']}) ok={t['ok']}")
    print(f"  correctness ok={(doc.get('correctness') or {}).get('ok')}; skipped {len(doc['skipped'])}, "
          f"errors {len(doc['errors'])}", flush=True)
