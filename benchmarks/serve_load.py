"""Serving load benchmark (not a test): throughput and TTFT/ITL percentiles vs concurrency of this project's
`llama3-deploy serve`, alone or against llama.cpp's OpenAI-compatible server as its users install it
(`llama-cpp-python[server]`, benchmarks/.venv-llamacpp), both on the same checkpoint at the same precision.

    python -m llama3_deploy.benchmarks.serve_load --ours work-out/cpu-bench-int8e \
        --llamacpp work-out/cpu-bench-q8_0.gguf --concurrency 1,2,4,8,16,32 --prompt-tokens 128 --max-tokens 64 \
        --out benchmarks/results/serve-load-cpu-bench
    python -m llama3_deploy.benchmarks.serve_load --ours work-out/big/llama3.1-8b-int4 --concurrency 1,4 \
        --prompt-tokens 128 --max-tokens 32 --model-name llama-3.1-8b-instruct \
        --precision "int4 (weight-only, block 32, symmetric)" --out benchmarks/results/serve-load-8b-int4

Without --llamacpp only our server runs (no llama.cpp columns, ratios or idle-CPU figures). With it, both
servers stay up for the run (the idle one is measured idle: its CPU time is recorded); the levels run
interleaved, one server then the other, the order alternating per repeat. Figures are medians over repeats.
Writes `<out>.json` (command, machine, versions, settings, every figure), `<out>.md` and `<out>.png`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llama3_deploy.fsutil import atomic_write_text

from .cli import git_info, machine_info

LLAMACPP_PYTHON = "benchmarks/.venv-llamacpp/bin/python"
FILLER = ("The history of the river valley is written in its stones, its fields and the records of the towns that "
          "grew along the water. Farmers measured the seasons by the floods, merchants by the boats, and scholars "
          "by the letters that travelled between the monasteries on either bank. ")
SERVERS = ("ours", "llamacpp")  # the full set; a run records the ones it used in settings["servers"]
PRECISION_VS_LLAMACPP = "int8 (ours: weight-only int8, block 32, symmetric; llama.cpp: q8_0)"


def _pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def build_prompts(tokenizer_dir: str | Path, n: int, prompt_tokens: int) -> list[str]:
    """`n` distinct texts of `prompt_tokens` tokens with the beginning-of-text token (distinct from their first
    words, so neither server can reuse a previous request's KV prefix)."""
    from llama3_deploy.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tokenizer_dir)
    out = []
    for i in range(n):
        text = f"Request {i}. " + FILLER * (prompt_tokens // 8 + 1)
        ids = tok.encode(text)[:prompt_tokens - 1]  # + BOS
        out.append(tok.decode(ids))
    return out


async def run_load(url: str, *, model: str, prompts: list[str], concurrency: int, requests_per_client: int,
                   max_tokens: int, extra: dict | None = None, timeout_s: float = 900.0) -> dict:
    """`concurrency` streaming clients, each sending `requests_per_client` greedy /v1/completions requests one
    after the other (client c sends prompts[c * requests_per_client + k]). Per request: TTFT (request sent ->
    first chunk with text), ITLs (gaps between chunks with text), e2e, completion tokens (the server's usage where
    it streams one, else max_tokens for finish_reason "length", else the chunk count)."""
    import httpx

    async def one(client, prompt):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                **(extra or {})}
        rec = {"ttft_s": None, "itl_s": [], "e2e_s": None, "completion_tokens": None, "chunks": 0,
               "finish_reason": None, "error": None}
        t0 = last = time.perf_counter()
        usage = None
        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                    return rec
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    usage = chunk.get("usage") or usage
                    for ch in chunk.get("choices") or []:
                        rec["finish_reason"] = ch.get("finish_reason") or rec["finish_reason"]
                        if ch.get("text"):
                            now = time.perf_counter()
                            if rec["ttft_s"] is None:
                                rec["ttft_s"] = now - t0
                            else:
                                rec["itl_s"].append(now - last)
                            last = now
                            rec["chunks"] += 1
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["e2e_s"] = time.perf_counter() - t0
        if usage and usage.get("completion_tokens") is not None:
            rec["completion_tokens"], rec["tokens_from"] = usage["completion_tokens"], "usage"
        elif rec["finish_reason"] == "length":
            rec["completion_tokens"], rec["tokens_from"] = max_tokens, "finish_reason=length"
        else:
            rec["completion_tokens"], rec["tokens_from"] = rec["chunks"], "chunks"
        return rec

    async def client_task(client, c):
        return [await one(client, prompts[(c * requests_per_client + k) % len(prompts)])
                for k in range(requests_per_client)]

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_task(client, c) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests_per_client": requests_per_client, "max_tokens": max_tokens,
            "wall_s": wall, "requests": [r for rs in per_client for r in rs]}


def summarize(load: dict) -> dict:
    """Per-level figures of one load run (times in ms)."""
    ok = [r for r in load["requests"] if not r["error"]]
    toks = sum(r["completion_tokens"] or 0 for r in ok)
    ttft = [r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None]
    itl = [x * 1e3 for r in ok for x in r["itl_s"]]
    e2e = [r["e2e_s"] * 1e3 for r in ok]
    s = {"concurrency": load["concurrency"], "requests": len(load["requests"]), "errors": len(load["requests"]) - len(ok),
         "completion_tokens": toks, "wall_s": load["wall_s"], "output_tok_s": toks / load["wall_s"],
         "requests_s": len(ok) / load["wall_s"],
         "finish_reasons": dict(sorted({str(r["finish_reason"]): sum(1 for x in ok if x["finish_reason"] == r["finish_reason"])
                                        for r in ok}.items())),
         "tokens_per_chunk": toks / max(1, sum(r["chunks"] for r in ok))}
    for name, vals in (("ttft_ms", ttft), ("itl_ms", itl), ("e2e_ms", e2e)):
        s[name] = {f"p{q}": _pct(vals, q) for q in (50, 90, 99)}
    if load["requests"] and any(r["error"] for r in load["requests"]):
        s["first_error"] = next(r["error"] for r in load["requests"] if r["error"])
    return s


# ---- servers -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """A server subprocess on a free loopback port; `start` waits until GET /v1/models answers 200."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path):
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.url, self.proc = f"http://127.0.0.1:{port}", None

    def start(self, timeout_s: float = 300.0) -> "ServerProc":
        import httpx
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s; see {self.log_path}")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()


def llamacpp_versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json, llama_cpp\n"
            "v = {p: m.version(p) for p in ('llama_cpp_python', 'fastapi', 'uvicorn', 'sse-starlette')}\n"
            "v['system_info'] = llama_cpp.llama_print_system_info().decode().strip()\nprint(json.dumps(v))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}


def our_versions() -> dict:
    import importlib.metadata as m
    return {p: m.version(p) for p in ("llama3-deploy", "onnxruntime", "fastapi", "uvicorn", "httpx")}


# ---- report ------------------------------------------------------------------------------------------------

def _f(x, nd=1):
    return "-" if x is None else f"{x:,.{nd}f}"


def _used(doc: dict) -> list[str]:
    """The servers a run used (reports written before `settings.servers` existed ran both)."""
    return doc["settings"].get("servers", list(SERVERS))


def markdown(doc: dict) -> str:
    st, used = doc["settings"], _used(doc)
    two = len(used) == 2
    lines = [f"# Serving load: {doc['model']} (RANDOM weights), {doc['precision']}", "",
             f"{doc['machine']['short']}; {st['threads']} threads{' per server' if two else ''}; prompt "
             f"{st['prompt_tokens']} tokens, {st['max_tokens']} greedy completion tokens, {st['requests_per_client']} "
             f"requests per client (at most {st['max_requests']} per level), medians of {st['repeats']} "
             f"{'interleaved ' if two else ''}repeats. Weights are seeded random: speed figures only.", "",
             *([doc["note"], ""] if doc.get("note") else []),
             *(f"- {'llama.cpp' if s == 'llamacpp' else s}: `{shlex.join(doc['servers'][s]['argv'][1:])}`"
               for s in used), "",
             "| C | server | out tok/s | req/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | errors |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for c in st["concurrency"]:
        for s in used:
            m = doc["medians"][s][str(c)]
            lines.append(f"| {c} | {doc['servers'][s]['label']} | {_f(m['output_tok_s'])} | {_f(m['requests_s'], 2)} | "
                         + " / ".join(_f(m["ttft_ms"][f"p{q}"], 0) for q in (50, 90, 99)) + " | "
                         + " / ".join(_f(m["itl_ms"][f"p{q}"], 1) for q in (50, 90, 99)) + f" | {m['errors']} |")
    if two:
        lines += ["", "Ours / llama.cpp (throughput: higher is better for ours; TTFT and ITL: lower is better for "
                  "ours):", "", "| C | throughput | TTFT p50 | ITL p50 |", "|---:|---:|---:|---:|"]
        for c in st["concurrency"]:
            r = doc["ratios"][str(c)]
            lines.append(f"| {c} | {_f(r['output_tok_s'], 2)}x | {_f(r['ttft_p50'], 2)}x | {_f(r['itl_p50'], 2)}x |")
        lines += ["", "Idle CPU of the waiting server, per second of the other's load: "
                  + ", ".join(f"{s} {doc['idle_cpu_per_s'][s]:.3f}" for s in used)]
    lines += ["", f"Command: `{doc['command']}`", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cs = doc["settings"]["concurrency"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("output_tok_s", None, "output tokens/s (total)"), ("ttft_ms", "p50", "TTFT p50 (ms)"),
              ("itl_ms", "p50", "ITL p50 (ms)"))
    for ax, (key, q, label) in zip(axes, panels):
        for s, style in zip(_used(doc), ("o-", "s--")):
            ys = [doc["medians"][s][str(c)][key] if q is None else doc["medians"][s][str(c)][key][q] for c in cs]
            ax.plot(cs, ys, style, label=doc["servers"][s]["label"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        if key == "ttft_ms":  # queueing makes TTFT span orders of magnitude
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{doc['model']} (RANDOM weights), {doc['precision']}, {doc['settings']['prompt_tokens']}-token "
                 f"prompts, {doc['settings']['max_tokens']} tokens; {doc['machine']['short']}, "
                 f"{doc['settings']['threads']} threads", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---- main --------------------------------------------------------------------------------------------------

def _median_summary(runs: list[dict]) -> dict:
    med = lambda xs: statistics.median(xs) if xs and None not in xs else None  # noqa: E731
    out = {k: med([r[k] for r in runs]) for k in ("output_tok_s", "requests_s", "wall_s", "tokens_per_chunk")}
    out["errors"] = sum(r["errors"] for r in runs)
    for k in ("ttft_ms", "itl_ms", "e2e_ms"):
        out[k] = {q: med([r[k][q] for r in runs]) for q in ("p50", "p90", "p99")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama3_deploy.benchmarks.serve_load", description=__doc__.splitlines()[0])
    p.add_argument("--ours", required=True, help="optimized-flavor export directory")
    p.add_argument("--llamacpp", help="GGUF file of llama.cpp's server (omit: only our server runs)")
    p.add_argument("--model-name", default="llama3-cpu-bench", help="model label of the report")
    p.add_argument("--precision", help=f"precision label of the report (default with --llamacpp: "
                   f"{PRECISION_VS_LLAMACPP!r}; without: 'int8 (weight-only, block 32, symmetric)')")
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-requests", type=int, default=64, help="cap of requests per level (fewer per client)")
    p.add_argument("--repeats", type=int, default=2, help="repeats of the whole sweep (medians)")
    p.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    p.add_argument("--slots", type=int, default=0, help="our --slots (0: the largest concurrency)")
    p.add_argument("--ctx", type=int, default=512, help="context of the servers (our --max-context, --n_ctx)")
    p.add_argument("--llamacpp-python", default=LLAMACPP_PYTHON)
    p.add_argument("--llamacpp-args", default="--interrupt_requests False",
                   help="extra llama_cpp.server options (its default interrupt_requests=True cuts a streaming "
                        "request short whenever another one arrives)")
    p.add_argument("--note", default="", help="a remark recorded in the report (e.g. other load on the machine)")
    p.add_argument("--out", required=True, help="output stem: writes <out>.json, .md, .png")
    a = p.parse_args(argv)
    used = SERVERS if a.llamacpp else SERVERS[:1]  # in SERVERS order: with two, the repeats alternate it
    two = len(used) == 2
    a.precision = a.precision or (PRECISION_VS_LLAMACPP if two else "int8 (weight-only, block 32, symmetric)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    levels = [int(x) for x in a.concurrency.split(",")]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path("work-out/serve-load-logs")
    logs.mkdir(parents=True, exist_ok=True)
    slots = a.slots or max(levels)
    per_client = {c: max(1, min(a.requests_per_client, a.max_requests // c)) for c in levels}
    prompts = build_prompts(a.ours, max(c * per_client[c] for c in levels), a.prompt_tokens)
    ours_argv = [str(Path(sys.executable).with_name("llama3-deploy")), "serve", "--model", a.ours, "--host", "127.0.0.1",
                 "--port", str(free_port()), "--slots", str(slots), "--max-waiting", str(max(64, 2 * max(levels))),
                 "--max-context", str(a.ctx), "--threads", str(a.threads), "--served-model-name", "m",
                 "--log-level", "warning"]
    argvs = {"ours": ours_argv}
    if two:
        argvs["llamacpp"] = [a.llamacpp_python, "-m", "llama_cpp.server", "--model", a.llamacpp, "--model_alias", "m",
                             "--host", "127.0.0.1", "--port", str(free_port()), "--n_ctx", str(a.ctx),
                             "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads), "--verbose", "False",
                             *shlex.split(a.llamacpp_args)]
    servers = {s: ServerProc(s, argvs[s], int(argvs[s][argvs[s].index("--port") + 1]), logs / f"{s}.log")
               for s in used}
    labels = {"ours": f"llama3-deploy serve (--slots {slots})",
              "llamacpp": "llama-cpp-python server (requests serialised)"}
    doc = {"benchmark": "serve-load", "command": shlex.join(["python", "-m", "llama3_deploy.benchmarks.serve_load",
                                                              *(argv if argv is not None else sys.argv[1:])]),
           "model": a.model_name, "precision": a.precision, "weights": "seeded random (speed figures only)",
           "machine": machine_info(), "git": git_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "settings": {"concurrency": levels, "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
                        "requests_per_client": a.requests_per_client, "requests_per_client_by_level": per_client,
                        "max_requests": a.max_requests, "repeats": a.repeats, "threads": a.threads, "slots": slots,
                        "ctx": a.ctx, "temperature": 0.0, "servers": list(used),
                        **({"both_servers_up": True} if two else {})},
           "artifacts": {"ours": {"path": a.ours, "bytes": sum(f.stat().st_size for f in Path(a.ours).iterdir())}},
           "versions": {"ours": our_versions()},
           "servers": {s: {"label": labels[s], "argv": argvs[s]} for s in used},
           "note": a.note, "runs": []}
    if two:  # probing llama-cpp-python's venv only when it runs
        doc["artifacts"]["llamacpp"] = {"path": a.llamacpp, "bytes": Path(a.llamacpp).stat().st_size}
        doc["versions"]["llamacpp"] = llamacpp_versions(a.llamacpp_python)
    extra = {"ours": {"stream_options": {"include_usage": True}}, "llamacpp": {}}
    idle = {s: [0.0, 0.0] for s in used}  # CPU seconds while the other server runs a load, wall seconds
    try:
        for s in used:
            servers[s].start()
            doc["servers"][s]["startup_s"] = servers[s].startup_s
            # warm-up: a non-streamed request (prompt/completion token counts from usage) and a small streamed load
            import httpx
            r = httpx.post(f"{servers[s].url}/v1/completions", timeout=600, json={
                "model": "m", "prompt": prompts[0], "max_tokens": 8, "temperature": 0.0}).json()
            doc["servers"][s]["warmup_usage"] = r.get("usage")
            asyncio.run(run_load(servers[s].url, model="m", prompts=prompts, concurrency=max(levels),
                                 requests_per_client=1, max_tokens=4, extra=extra[s]))  # ours: every batch size
            print(f"{s}: up in {servers[s].startup_s:.1f} s, warm-up usage {r.get('usage')}", flush=True)
        for rep in range(a.repeats):
            for c in levels:
                for s in (used if (rep + levels.index(c)) % 2 == 0 else used[::-1]):
                    other = servers[used[1 - used.index(s)]] if two else None
                    cpu0 = other.cpu_s() if other else 0.0
                    load = asyncio.run(run_load(servers[s].url, model="m", prompts=prompts, concurrency=c,
                                                requests_per_client=per_client[c], max_tokens=a.max_tokens,
                                                extra=extra[s]))
                    if other:
                        idle[other.name][0] += other.cpu_s() - cpu0
                        idle[other.name][1] += load["wall_s"]
                    summ = summarize(load)
                    doc["runs"].append({"repeat": rep, "server": s, "summary": summ,
                                        "requests": [{k: (round(v, 5) if isinstance(v, float) else v)
                                                      for k, v in r.items() if k != "itl_s"} for r in load["requests"]]})
                    print(f"rep {rep} C={c:>2} {s:9} {summ['output_tok_s']:8.1f} tok/s  TTFT p50 "
                          f"{summ['ttft_ms']['p50']:8.0f} ms  ITL p50 {summ['itl_ms']['p50'] or 0:7.1f} ms  "
                          f"errors {summ['errors']}  finish {summ['finish_reasons']}", flush=True)
    finally:
        for s in used:
            servers[s].stop()
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["machine"]["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if two:
        doc["idle_cpu_per_s"] = {s: idle[s][0] / idle[s][1] if idle[s][1] else 0.0 for s in used}
    doc["medians"] = {s: {str(c): _median_summary([r["summary"] for r in doc["runs"]
                                                   if r["server"] == s and r["summary"]["concurrency"] == c])
                          for c in levels} for s in used}
    if two:  # ours / llama.cpp per level
        m = {s: {c: doc["medians"][s][str(c)] for c in levels} for s in used}
        div = lambda x, y: x / y if x is not None and y else None  # noqa: E731
        doc["ratios"] = {str(c): {"output_tok_s": div(m["ours"][c]["output_tok_s"], m["llamacpp"][c]["output_tok_s"]),
                                  "ttft_p50": div(m["ours"][c]["ttft_ms"]["p50"], m["llamacpp"][c]["ttft_ms"]["p50"]),
                                  "itl_p50": div(m["ours"][c]["itl_ms"]["p50"], m["llamacpp"][c]["itl_ms"]["p50"])}
                         for c in levels}
    try:
        plot(doc, Path(f"{out}.png"))
        doc["plot"] = Path(f"{out}.png").name
    except ImportError as e:
        doc["plot_skipped"] = str(e)
    atomic_write_text(Path(f"{out}.json"), json.dumps(doc, indent=1))
    atomic_write_text(Path(f"{out}.md"), markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
