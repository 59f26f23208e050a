"""A benchmark JSON rendered for people: a Markdown table and PNG plots (matplotlib, no display needed)."""
from __future__ import annotations

import json
from pathlib import Path

from llama3_deploy.fsutil import atomic_write_text


def _gib(n) -> str:
    return f"{n / (1 << 30):.2f}" if n else "-"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _f(x, nd=1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _wins(wins: dict | None, key: str) -> str:
    return f" ({wins[key]}/{wins['rounds']})" if wins and wins.get("rounds") else ""


def result_rows(doc: dict) -> list[dict]:
    """Results ordered by cell (batch, then prompt length) and engine order of the run. Engines that share a
    name (one peer at several precisions) are told apart by their precision."""
    order = {e["key"]: i for i, e in enumerate(doc.get("engines", []))}
    keys_by_name: dict[str, set] = {}
    for r in doc["results"]:
        keys_by_name.setdefault(r["engine"], set()).add(r["key"])
    rows = [{**r, "engine": f"{r['engine']} ({r['dtype']})"} if len(keys_by_name[r["engine"]]) > 1 else r
            for r in doc["results"]]
    return sorted(rows, key=lambda r: (r["batch"], r["prompt_len"], order.get(r["key"], 99)))


def markdown(doc: dict) -> str:
    """The results table with its context: what ran, where, how, and against which floor."""
    m, p, fl = doc["machine"], doc["protocol"], doc["floor"]
    model = doc["model"]
    dev_mem = any(r.get("peak_device_bytes") for r in doc["results"])
    lines = [
        f"# {doc['title']}",
        "",
        f"**Weights are seeded random (not trained)**: latency and memory are meaningful, output text is not. "
        f"Model: {model['name']} ({_params(model['parameters'])} parameters, {model['dtype']}, "
        f"{model['config']['num_hidden_layers']} layers, hidden {model['config']['hidden_size']}, "
        f"vocabulary {model['config']['vocab_size']}).",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus')} cores, {m.get('mem_total_gib')} GiB RAM"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; load average at start {m.get('loadavg_start')}, "
        f"end {m.get('loadavg_end')}. Commit `{doc['git']['commit'][:12]}`{' (dirty tree)' if doc['git'].get('dirty') else ''}; "
        f"{doc['started']}, {doc['wall_s'] / 60:.1f} min.",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Protocol: greedy, {p['new_tokens']} forced new tokens per row, same seeded random prompts for every engine; "
        f"{p['warmup']} warm-up + {p['reps']} timed rounds per cell, engines interleaved (order rotated each round), "
        f"each engine in its own process; figures are medians over rounds. TPOT p50/p90/p99 are over one round's "
        f"{p['new_tokens'] - 1} decode steps. tok/s = batch x new tokens / (TTFT + all steps).",
        "",
        f"Floor (measured in this run): bandwidth {fl['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (copy, read + write), "
        f"matmul {fl['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({fl['matmul_dtype']}). TPOT floor = (weights once + KV "
        f"cache at the mean context) / bandwidth; TTFT floor = max(prefill FLOPs / matmul rate, weight bytes / "
        f"bandwidth). x floor and x PyTorch are ratios of time (lower is better; 1.00x = at the floor); "
        f"(k/n) after x PyTorch: the rounds, of n, in which the engine was faster than PyTorch in that same round.",
        "",
    ]
    head = ["Engine", "Prec.", "Prompt", "Batch", "TTFT ms", "TTFT floor", "x floor", "TPOT p50", "p90", "p99",
            "TPOT floor", "x floor", "tok/s", "Peak RSS GiB"] + (["Peak GPU GiB"] if dev_mem else []) + \
           ["TTFT x PyTorch", "TPOT x PyTorch"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result_rows(doc):
        f = r.get("floor") or {}
        rf, rp = r.get("ratio_to_floor") or {}, r.get("ratio_to_pytorch") or {}
        row = [r["engine"], r["dtype"], str(r["prompt_len"]), str(r["batch"]), _f(r["ttft_ms"]),
               _f(f.get("ttft_floor_ms")), _ratio(rf.get("ttft")), _f(r["tpot_ms"]["p50"], 2),
               _f(r["tpot_ms"]["p90"], 2), _f(r["tpot_ms"]["p99"], 2), _f(f.get("tpot_floor_ms"), 2),
               _ratio(rf.get("tpot_p50")), _f(r["tokens_per_s"]), _gib(r["peak_rss_bytes"])]
        row += [_gib(r.get("peak_device_bytes"))] if dev_mem else []
        wins = r.get("rounds_faster_than_pytorch")
        row += [_ratio(rp.get("ttft")) + _wins(wins, "ttft"), _ratio(rp.get("tpot_p50")) + _wins(wins, "tpot_p50")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Engines (versions as run):", ""]
    for e in doc["engines"]:
        env = e.get("env_versions")
        lines.append(f"- **{e.get('engine', e['key'])}**: {e.get('version') or 'did not run (below)'}"
                     + (f" (own virtual environment: {', '.join(f'{k} {v}' for k, v in env.items())})" if env else "")
                     + (f"; artifact: {e['artifact_note']}" if e.get("artifact_note") else ""))
    built = [(k, b) for k, b in doc.get("builds", {}).items() if b.get("memory")]
    if built:
        lines += ["", "Builds (each tool's own command; peak RSS is the kernel's high-water mark, anonymous memory "
                  "the largest sample over the process tree):", ""]
        lines += [f"- {k}: {b['seconds']} s, peak RSS {b['memory']['peak_rss_gib']} GiB, anonymous "
                  f"{b['memory']['peak_anon_gib']} GiB{' (cached from an earlier run)' if b.get('cached') else ''}"
                  for k, b in built]
    if doc.get("skipped") or doc.get("errors"):
        lines += ["", "Did not run:", ""]
        for s in doc.get("skipped", []):
            lines.append(f"- {s['engine']}: {s['reason']}")
        seen = set()
        for e in doc.get("errors", []):
            if (e["key"], e["error"]) not in seen:
                seen.add((e["key"], e["error"]))
                lines.append(f"- {e['key']} ({e['prompt_len']}x{e['batch']} and maybe others): {e['error']}")
    same = [r["tokens_equal_pytorch"] for r in doc["results"] if r.get("tokens_equal_pytorch") is not None]
    if same:
        lines += ["", f"Same model check: share of each engine's greedy tokens (first row) equal to PyTorch's in the "
                  f"same cell: min {min(same):.2f}, mean {sum(same) / len(same):.2f}."]
    lines += ["", "Peak RSS: the engine's own worker process, load included (kernel high-water mark, VmHWM); "
              "`peak_rss_generate_bytes` in the JSON is the peak during generation only.", ""]
    if doc.get("plots"):
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in doc["plots"]] + [""]
    return "\n".join(lines)


def plots(doc: dict, out_dir: str | Path, stem: str) -> list[Path]:
    """TPOT vs context and TTFT vs prompt length (batch 1), decode tokens/s vs batch; floors dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    results = result_rows(doc)
    engines = list(dict.fromkeys(r["engine"] for r in results))
    made = []

    def series(engine, batch=None, prompt=None):
        rows = [r for r in results if r["engine"] == engine and (batch is None or r["batch"] == batch)
                and (prompt is None or r["prompt_len"] == prompt)]
        return sorted(rows, key=lambda r: (r["prompt_len"], r["batch"]))

    def floor_line(ax, rows, x_of, y_of, label, style="k--"):
        if rows and all(r.get("floor") for r in rows):
            ax.plot([x_of(r) for r in rows], [y_of(r) for r in rows], style, lw=1, label=label)

    specs = [
        ("tpot-vs-context", "Time per output token vs context (batch 1)", "prompt length (tokens)",
         "TPOT p50 (ms)", dict(batch=1), lambda r: r["prompt_len"], lambda r: r["tpot_ms"]["p50"],
         lambda r: r["floor"]["tpot_floor_ms"], "floor (bytes / bandwidth)"),
        ("ttft-vs-prompt", "Time to first token vs prompt length (batch 1)", "prompt length (tokens)",
         "TTFT (ms)", dict(batch=1), lambda r: r["prompt_len"], lambda r: r["ttft_ms"],
         lambda r: r["floor"]["ttft_floor_ms"], "floor (FLOPs / matmul rate)"),
    ]
    prompts_multi = sorted({r["prompt_len"] for r in results if r["batch"] > 1})
    if prompts_multi:
        p0 = prompts_multi[0]
        specs.append(("throughput-vs-batch", f"Decode throughput vs batch (prompt {p0})", "batch",
                      "decode tokens/s (batch / TPOT p50)", dict(prompt=p0), lambda r: r["batch"],
                      lambda r: r["batch"] / r["tpot_ms"]["p50"] * 1e3,
                      lambda r: r["batch"] / r["floor"]["tpot_floor_ms"] * 1e3, "ceiling (floor)"))
    for name, title, xlabel, ylabel, sel, x_of, y_of, fy_of, flabel in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        any_rows = False
        for eng in engines:
            rows = series(eng, **sel)
            if len({x_of(r) for r in rows}) < 1:
                continue
            any_rows = True
            ax.plot([x_of(r) for r in rows], [y_of(r) for r in rows], "o-", label=eng)
        for n, dtype in enumerate(dict.fromkeys(r["dtype"] for r in results)):  # one floor per precision
            ref = max((series(eng, **sel) for eng in engines if series(eng, **sel)
                       and series(eng, **sel)[0]["dtype"] == dtype), key=len, default=[])
            floor_line(ax, ref, x_of, fy_of, f"{flabel}, {dtype}", style=("k--", "k:", "k-.")[n % 3])
        if not any_rows:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        xs = sorted({x_of(r) for eng in engines for r in series(eng, **sel)})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{doc['model']['name']}, {doc['model']['dtype']}, random weights, {doc['machine'].get('short', '')}",
                     fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def write_report(doc: dict, out_dir: str | Path, stem: str) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` and the PNGs into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        pngs = plots(doc, out_dir, stem)
    except ImportError as e:  # a machine without matplotlib still gets the JSON and the table
        pngs = []
        doc["plots_skipped"] = f"no plots: {e}"
    doc["plots"] = [p.name for p in pngs]
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_text(json_path, json.dumps(doc, indent=1))
    atomic_write_text(md_path, markdown(doc))
    return {"json": json_path, "markdown": md_path, **{p.stem: p for p in pngs}}


def builds_markdown(doc: dict) -> str:
    """The builds of a --prepare-only run: what each tool made, in what time and memory, or why it did not."""
    m = doc["machine"]
    lines = [f"# Builds: {doc['model']} ({doc['dtype']}), weights {doc['weights']}", "",
             f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs, {m.get('mem_total_gib', '?')} GiB; "
             f"started {doc['started']}, {doc['wall_s']} s in all.", "", f"Command: `{doc['command']}`", "",
             "Peak RSS: the kernel's high-water mark of the build process (its waited-for children included); "
             "anonymous: the largest sample of the process tree's anonymous memory (what the machine must hold; "
             "mmapped checkpoint pages can be dropped). A build is stopped when the machine has under 1 GiB left.",
             "", "| build | result | time s | peak RSS GiB | anonymous GiB | command |", "|---|---|---:|---:|---:|---|"]
    for k, b in doc["builds"].items():
        mem = b.get("memory") or {}
        lines.append(f"| {k} | finished{' (cached)' if b.get('cached') else ''} | {b.get('seconds')} | "
                     f"{mem.get('peak_rss_gib', '-')} | {mem.get('peak_anon_gib', '-')} | "
                     f"`{b.get('command') or '-'}` |")
    for s in doc["skipped"]:
        mem = s.get("memory") or {}
        lines.append(f"| {s['engine']} | **did not finish**: {s['reason'].splitlines()[0]} | "
                     f"{mem.get('seconds', '-')} | {mem.get('peak_rss_gib', '-')} | "
                     f"{mem.get('peak_anon_gib', '-')} | |")
    return "\n".join(lines + [""])


def write_builds_report(doc: dict, out_dir: str | Path, stem: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_text(json_path, json.dumps(doc, indent=1))
    atomic_write_text(md_path, builds_markdown(doc))
    return {"json": json_path, "markdown": md_path}


def print_table(doc: dict, file=None) -> None:
    """A short plain-text table for a terminal."""
    print(f"{'engine':44} {'prompt':>6} {'batch':>5} {'TTFT ms':>9} {'TPOT p50':>9} {'floor':>7} {'x floor':>7} "
          f"{'x torch':>7} {'tok/s':>8}", file=file)
    for r in result_rows(doc):
        f = r.get("floor") or {}
        rp = r.get("ratio_to_pytorch") or {}
        print(f"{r['engine'][:44]:44} {r['prompt_len']:>6} {r['batch']:>5} {r['ttft_ms']:>9.1f} "
              f"{r['tpot_ms']['p50']:>9.2f} {_f(f.get('tpot_floor_ms'), 2):>7} {_ratio((r.get('ratio_to_floor') or {}).get('tpot_p50')):>7} "
              f"{_ratio(rp.get('tpot_p50')):>7} {r['tokens_per_s']:>8.1f}", file=file)


def summary_markdown(doc: dict) -> str:
    """A compact table for a README: per engine, batch-1 TTFT and TPOT across prompt lengths, the largest
    batch's throughput, ratios to PyTorch eager in parentheses (time ratios, lower is better)."""
    rows = result_rows(doc)
    prompts = sorted({r["prompt_len"] for r in rows if r["batch"] == 1})
    big = max((r["batch"] for r in rows), default=1)
    big_prompt = min((r["prompt_len"] for r in rows if r["batch"] == big), default=None)
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    cell = {(r["engine"], r["prompt_len"], r["batch"]): r for r in rows}
    head = (["Engine"] + [f"TTFT ms @{p}" for p in prompts] + [f"TPOT ms @{p}" for p in prompts]
            + ([f"tok/s b{big} @{big_prompt}"] if big > 1 else []) + ["TPOT x floor @" + str(prompts[0])])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in engines:
        vals = [e]
        for p in prompts:
            r = cell.get((e, p, 1))
            vals.append(f"{r['ttft_ms']:,.0f} ({_ratio((r.get('ratio_to_pytorch') or {}).get('ttft'))})" if r else "-")
        for p in prompts:
            r = cell.get((e, p, 1))
            vals.append(f"{r['tpot_ms']['p50']:.1f} ({_ratio((r.get('ratio_to_pytorch') or {}).get('tpot_p50'))})"
                        if r else "-")
        if big > 1:
            r = cell.get((e, big_prompt, big))
            vals.append(f"{r['tokens_per_s']:,.1f}" if r else "-")
        r = cell.get((e, prompts[0], 1))
        vals.append(_ratio((r.get("ratio_to_floor") or {}).get("tpot_p50")) if r else "-")
        out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Re-render a result JSON: `python -m llama3_deploy.benchmarks.report RESULT.json [--summary]`."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m llama3_deploy.benchmarks.report", description=main.__doc__)
    p.add_argument("result", help="a benchmark JSON")
    p.add_argument("--summary", action="store_true", help="print the compact README table only")
    args = p.parse_args(argv)
    path = Path(args.result)
    doc = json.loads(path.read_text())
    if args.summary:
        print(summary_markdown(doc))
        return 0
    for p_ in write_report(doc, path.parent, path.stem).values():
        print(p_)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
