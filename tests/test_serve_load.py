"""The serving load benchmark's client on the tiny served export: it runs, and its records have their shape.
Not the speed itself."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from llama3_deploy.benchmarks import serve_load as S  # noqa: E402
from llama3_deploy.server.app import create_app  # noqa: E402

from .server_helpers import ServerThread  # noqa: E402


def test_load_generator_records_on_the_real_server(served_export):
    from llama3_deploy.runtime.engine import Engine
    prompts = S.build_prompts(served_export, 4, 12)
    assert len(set(prompts)) == 4
    engine = Engine(served_export, slots=2, max_waiting=8, prefill_chunk=16).start()
    with ServerThread(create_app(engine, model_name="tiny", drain_timeout_s=5)) as s:
        load = asyncio.run(S.run_load(s.url, model="tiny", prompts=prompts, concurrency=2, requests_per_client=2,
                                      max_tokens=4, extra={"stream_options": {"include_usage": True}},
                                      timeout_s=60))
    assert load["concurrency"] == 2 and load["wall_s"] > 0 and len(load["requests"]) == 4
    for r in load["requests"]:
        assert r["error"] is None, r["error"]
        assert r["tokens_from"] == "usage" and 1 <= r["completion_tokens"] <= 4
        assert r["finish_reason"] in ("length", "stop")
        assert 0 < r["e2e_s"] and (r["ttft_s"] is None or r["ttft_s"] <= r["e2e_s"])
        assert len(r["itl_s"]) == max(0, r["chunks"] - 1) and all(x >= 0 for x in r["itl_s"])
    summ = S.summarize(load)
    assert summ["requests"] == 4 and summ["errors"] == 0
    assert summ["completion_tokens"] == sum(r["completion_tokens"] for r in load["requests"])
    assert summ["output_tok_s"] > 0 and summ["requests_s"] > 0
    assert set(summ["ttft_ms"]) == set(summ["itl_ms"]) == {"p50", "p90", "p99"}
    assert sum(summ["finish_reasons"].values()) == 4


def test_an_unreachable_server_is_an_error_record_not_a_crash():
    load = asyncio.run(S.run_load(f"http://127.0.0.1:{S.free_port()}", model="m", prompts=["x"], concurrency=1,
                                  requests_per_client=1, max_tokens=2, timeout_s=5))
    (r,) = load["requests"]
    assert r["error"] and r["completion_tokens"] == 0
    assert S.summarize(load)["errors"] == 1


def _synthetic_doc(servers):
    """A report document as `main` writes it, with made-up figures, for the servers given."""
    levels = [1, 4]
    fig = lambda k: {"output_tok_s": 10.0 * k, "requests_s": 0.5 * k, "wall_s": 2.0, "tokens_per_chunk": 1.0,  # noqa: E731
                     "errors": 0, **{m: {"p50": 5.0 * k, "p90": 6.0 * k, "p99": 7.0 * k}
                                     for m in ("ttft_ms", "itl_ms", "e2e_ms")}}
    doc = {"model": "tiny-model", "precision": "int4 (weight-only)", "command": "python -m serve_load --ours x",
           "machine": {"short": "2-core test box"}, "note": "",
           "settings": {"concurrency": levels, "prompt_tokens": 12, "max_tokens": 4, "requests_per_client": 2,
                        "max_requests": 16, "repeats": 2, "threads": 2, "servers": list(servers)},
           "servers": {s: {"label": {"ours": "llama3-deploy serve (--slots 4)", "llamacpp": "llama-cpp-python"}[s],
                           "argv": ["bin", s, "--port", "1"]} for s in servers},
           "medians": {s: {str(c): fig(c) for c in levels} for s in servers}}
    if len(servers) == 2:
        doc["settings"]["both_servers_up"] = True
        doc["ratios"] = {str(c): {"output_tok_s": 1.5, "ttft_p50": 0.5, "itl_p50": 0.8} for c in levels}
        doc["idle_cpu_per_s"] = {"ours": 0.01, "llamacpp": 0.02}
    return doc


def test_markdown_of_one_server_has_no_llamacpp_text():
    md = S.markdown(_synthetic_doc(["ours"]))
    assert md.startswith("# Serving load: tiny-model (RANDOM weights), int4 (weight-only)")
    assert "seeded random" in md and "- ours: `ours --port 1`" in md
    assert "llama.cpp" not in md and "llama-cpp" not in md and "Idle CPU" not in md
    assert "throughput" not in md and "interleaved" not in md and "per server" not in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "llama3-deploy serve" in ln]
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 4"] and rows[1].endswith("| 0 |")
    assert "Command: `python -m serve_load --ours x`" in md


def test_markdown_of_two_servers_keeps_the_comparison():
    md = S.markdown(_synthetic_doc(["ours", "llamacpp"]))
    assert "(RANDOM weights)" in md and "medians of 2 interleaved repeats" in md
    assert "- llama.cpp: `llamacpp --port 1`" in md and "| 4 | 1.50x | 0.50x | 0.80x |" in md
    assert "Idle CPU of the waiting server, per second of the other's load: ours 0.010, llamacpp 0.020" in md
    old = _synthetic_doc(["ours", "llamacpp"])
    del old["settings"]["servers"]  # reports written before the key existed ran both
    assert S.markdown(old) == md


def test_plot_of_one_server(tmp_path):
    pytest.importorskip("matplotlib")
    S.plot(_synthetic_doc(["ours"]), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in tmp_path.iterdir()] == ["p.png"]


def test_main_with_only_our_server(served_export, tmp_path, monkeypatch):
    """End to end without --llamacpp: `llama3-deploy serve` in a subprocess, two levels, two repeats."""
    import json
    import signal
    monkeypatch.chdir(tmp_path)  # main writes its server logs under work-out/
    old_handler = signal.getsignal(signal.SIGTERM)
    try:
        assert S.main(["--ours", str(served_export), "--concurrency", "1,2", "--prompt-tokens", "12",
                       "--max-tokens", "4", "--requests-per-client", "1", "--repeats", "2", "--threads", "1",
                       "--ctx", "64", "--model-name", "tiny", "--out", str(tmp_path / "r")]) == 0
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["settings"]["servers"] == ["ours"] and "both_servers_up" not in doc["settings"]
    assert "ratios" not in doc and "idle_cpu_per_s" not in doc
    assert set(doc["medians"]) == set(doc["servers"]) == set(doc["artifacts"]) == set(doc["versions"]) == {"ours"}
    assert set(doc["medians"]["ours"]) == {"1", "2"}
    assert all(m["errors"] == 0 and m["output_tok_s"] > 0 for m in doc["medians"]["ours"].values())
    assert [(r["repeat"], r["server"], r["summary"]["concurrency"]) for r in doc["runs"]] == [
        (0, "ours", 1), (0, "ours", 2), (1, "ours", 1), (1, "ours", 2)]
    md = (tmp_path / "r.md").read_text()
    assert "(RANDOM weights)" in md and "llama.cpp" not in md
    assert doc.get("plot") == "r.png" or "plot_skipped" in doc
