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
