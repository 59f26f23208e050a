"""The continuous-batching engine (runtime/engine.py): concurrent requests share decode steps, and every request's
output equals running it alone; slots, admission, cancellation, draining and a dying loop."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llama3_deploy.errors import DeployError
from llama3_deploy.runtime import Generator
from llama3_deploy.runtime.engine import Engine, EngineBusy, EngineStopped, FinishEvent, TokenEvent
from llama3_deploy.runtime.sampling import SamplingParams

PROMPTS = [[5, 9, 33], list(range(40, 61)), [7] * 12, [100, 200, 300, 400, 500, 600, 700], [8, 8],
           list(range(300, 330))]


@pytest.fixture(scope="module")
def alone(served_export):
    return Generator(served_export)


@pytest.fixture()
def engine(served_export):
    e = Engine(served_export, slots=4, max_waiting=8, prefill_chunk=8).start()
    yield e
    e.shutdown(drain_timeout_s=0)


def _collect():
    events, done = [], threading.Event()

    def sink(ev):
        events.append(ev)
        if isinstance(ev, FinishEvent):
            done.set()
    return events, done, sink


def test_concurrent_requests_equal_running_each_alone(engine, alone):
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True),
              SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)]
    runs = []
    for k, ids in enumerate(PROMPTS):  # 6 requests on 4 slots: two wait, chunked prefills interleave with decode
        events, done, sink = _collect()
        runs.append((ids, params[k % 2], events, done, engine.submit(ids, params[k % 2], sink)))
    for ids, p, events, done, _ in runs:
        assert done.wait(60)
        got = [e.token_id for e in events if isinstance(e, TokenEvent)]
        want = alone.generate(ids, p)
        assert got == want.generated_ids, ids
        assert "".join(e.text for e in events) == want.text
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == p.max_new_tokens
    s = engine.stats()
    assert s.max_rows_in_a_step >= 3 and s.running == 0 and s.waiting == 0 and s.alive


def test_an_export_without_argmax_and_a_lone_request_on_many_slots(tok_checkpoint, tmp_path):
    """Logits-only exports decode through the same step; a lone request in slot 0 of 8 decodes one row."""
    from llama3_deploy.export.pipeline import export_model
    out = export_model(str(tok_checkpoint), tmp_path / "opt", flavor="optimized", progress=False).output
    e = Engine(out, slots=8, prefill_chunk=8).start()
    try:
        p = SamplingParams(max_new_tokens=6, ignore_eos=True)
        tokens, _, _ = e.generate(PROMPTS[1], p)
        assert tokens == Generator(out).generate(PROMPTS[1], p).generated_ids
        assert e.stats().max_rows_in_a_step == 1 and e.cache._ran[0] == 1  # the last step ran one row, not 8
    finally:
        e.shutdown(drain_timeout_s=0)


def test_stop_ids_stop_strings_and_logprobs(engine, alone):
    ids = PROMPTS[1]
    free = alone.generate(ids, max_new_tokens=8, ignore_eos=True).generated_ids
    tokens, _, reason = engine.generate(ids, SamplingParams(max_new_tokens=8, stop_token_ids=(free[3],),
                                                            ignore_eos=True))
    assert tokens == free[:free.index(free[3])] and reason == "stop"
    events, done, sink = _collect()
    engine.submit(ids, SamplingParams(max_new_tokens=4, logprobs=3, ignore_eos=True), sink)
    assert done.wait(30)
    toks = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.token_id for e in toks] == free[:4]
    for e in toks:  # greedy: the sampled token is the most likely one, with its logprob
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token_id == e.token_id
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob


def test_cancel_frees_the_slot_within_a_step(engine):
    events, done, sink = _collect()
    h = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True), sink)
    while not any(isinstance(e, TokenEvent) for e in events):
        time.sleep(0.001)
    h.cancel()
    assert done.wait(10) and events[-1].finish_reason == "cancelled"
    assert len([e for e in events if isinstance(e, TokenEvent)]) < 200
    deadline = time.monotonic() + 5
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0


def test_admission_is_bounded(served_export):
    e = Engine(served_export, slots=1, max_waiting=1).start()
    try:
        long = SamplingParams(max_new_tokens=150, ignore_eos=True)
        handles = [e.submit([5, 6], long, lambda ev: None) for _ in range(2)]  # one running, one waiting
        with pytest.raises(EngineBusy, match="slots are busy"):
            e.submit([5, 6], long, lambda ev: None)
        for h in handles:
            h.cancel()
        for h in handles:
            assert h.finished.wait(10)
    finally:
        e.shutdown(drain_timeout_s=0)


def test_bad_requests_are_refused(engine, tok_export):
    with pytest.raises(DeployError, match="exceeds the context"):
        engine.submit([5] * 10, SamplingParams(max_new_tokens=engine.max_context), lambda ev: None)
    with pytest.raises(DeployError, match="token ids"):
        engine.submit([5, 10 ** 9], SamplingParams(), lambda ev: None)
    with pytest.raises(DeployError, match="empty prompt"):
        engine.submit([], SamplingParams(), lambda ev: None)
    with pytest.raises(DeployError, match="--flavor optimized"):
        Engine(tok_export)
    with pytest.raises(DeployError, match="slots"):
        Engine(tok_export, slots=0)


def test_shutdown_drains_then_refuses(served_export):
    e = Engine(served_export, slots=2).start()
    events, done, sink = _collect()
    e.submit(PROMPTS[0], SamplingParams(max_new_tokens=20, ignore_eos=True), sink)
    e.shutdown(drain_timeout_s=30)
    assert done.is_set() and events[-1].finish_reason == "length"
    assert not e.stats().alive
    with pytest.raises(EngineStopped):
        e.submit(PROMPTS[0], SamplingParams(), lambda ev: None)


def test_a_dying_loop_fails_every_request_and_reports_it(served_export, monkeypatch):
    e = Engine(served_export, slots=2).start()

    def broken(*a, **k):
        raise RuntimeError("device lost")
    monkeypatch.setattr(e.cache, "decode", broken)
    events, done, sink = _collect()
    e.submit(PROMPTS[0], SamplingParams(max_new_tokens=5), sink)
    assert done.wait(10) and events[-1].finish_reason == "error" and "device lost" in events[-1].error
    assert not e.stats().alive
    with pytest.raises(EngineStopped, match="device lost"):
        e.submit(PROMPTS[0], SamplingParams(), lambda ev: None)
    e.shutdown(drain_timeout_s=0)


def test_penalties_only_count_generated_tokens():
    from llama3_deploy.runtime.sampling import Sampler
    logits = np.array([3.0, 2.9, 0.0, -1.0], np.float32)
    s = Sampler(SamplingParams(presence_penalty=0.5), 1, 4, prompts=[[0, 0, 0]])
    assert s(logits, 0) == 0  # the prompt's 0s are not penalised
    assert s(logits, 0) == 1  # 3.0 - 0.5 < 2.9
    f = Sampler(SamplingParams(frequency_penalty=0.06), 1, 4)
    assert [f(logits, 0) for _ in range(3)] == [0, 0, 1]  # 3.0 - 2 x 0.06 = 2.88 < 2.9
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": float("nan")}, {"logprobs": 21},
                {"stop_token_ids": [-1]}, {"stop_token_ids": list(range(65))}):
        with pytest.raises(DeployError):
            SamplingParams(**bad)
