"""Hostile input for the server: schema fuzzing from the app's own OpenAPI (schemathesis), random bytes and
crafted bodies. Nothing may answer 5xx, every error is in OpenAI's shape, and the server still works after."""
from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

schemathesis = pytest.importorskip("schemathesis")

from starlette.testclient import TestClient  # noqa: E402

from llama3_deploy.server.app import create_app  # noqa: E402

from .server_helpers import FakeEngine, build_tokenizer  # noqa: E402

MSGS = [{"role": "user", "content": "hi"}]


def fuzz(max_examples: int) -> settings:
    """Bounded, reproducible runs (derandomized, no example database)."""
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))



# Cases per operation and generation mode (valid and invalid bodies); small operations saturate sooner.
EXAMPLES = {"/v1/chat/completions": 300, "/v1/completions": 300, "/v1/models/{model}": 60}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # No step delay: valid fuzz cases may ask for the whole context, with n up to 8.
    e = FakeEngine(build_tokenizer(tmp_path_factory.mktemp("fuzztok")), slots=8, max_waiting=64, step_s=0).start()
    yield e
    e.shutdown(drain_timeout_s=0)


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, model_name="tiny", shutdown_engine=False)


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, raise_server_exceptions=False) as client:  # runs the lifespan, as uvicorn does
        yield client


def check_reply(status: int, headers, body: bytes) -> None:
    """No 5xx; an error is {"error": {message, type, param, code}}."""
    assert status < 500, (status, body[:300])
    if status >= 400:
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), body[:300]


def _drained(engine) -> None:
    deadline = time.monotonic() + 10
    while engine.stats().running or engine.stats().waiting:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


def test_schema_fuzz(engine):
    from schemathesis import GenerationMode
    # An app of its own: schemathesis runs the app's lifespan, whose shutdown marks the app as draining.
    app = create_app(engine, model_name="tiny", shutdown_engine=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    counts: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @fuzz(EXAMPLES.get(op.path, 20))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "tiny"  # reach the engine; wrong names are the negative mode's job
                r = case.call()
                counts[op.path] = counts.get(op.path, 0) + 1
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                check_reply(r.status_code, r.headers, r.content)
            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (GET /health, /metrics, /v1/models take no input)
                assert mode == GenerationMode.NEGATIVE
    total = sum(counts.values())
    print(f"schema fuzz: {total} cases {counts}; statuses {dict(sorted(statuses.items()))}")
    assert total >= 1000 and not any(s >= 500 for s in statuses)
    assert statuses.get(200, 0) > 50 and sum(v for s, v in statuses.items() if 400 <= s < 500) > 300
    _drained(engine)
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@fuzz(150)
@given(body=st.binary(max_size=512), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       ctype=st.sampled_from(["application/json", "text/plain", None]))
def test_random_bytes(http, body, path, ctype):
    r = http.post(path, content=body, headers={"content-type": ctype} if ctype else {})
    assert r.status_code in (400, 404, 413), r.text[:200]
    check_reply(r.status_code, r.headers, r.content)


_chat = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
HOSTILE = [
    b"[" * 200_000 + b"]" * 200_000,                                    # deep nesting
    b'{"model": "tiny", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    (_chat + '"max_tokens": 1' + "0" * 5000 + "}").encode(),           # a 5,000-digit integer
    (_chat + '"temperature": 1e999}').encode(),                          # overflows to inf
    (_chat + '"temperature": NaN}').encode(),
    (_chat + '"top_p": -Infinity}').encode(),
    (_chat + '"max_tokens": 1e30}').encode(),
    (_chat + '"seed": 1' + "0" * 30 + "}").encode(),
    (_chat + '"n": 100000}').encode(),
    (_chat + '"max_tokens": -1}').encode(),
    (_chat + '"stop": ["' + "x" * 300 + '"]}').encode(),
    (_chat + '"stop": ' + json.dumps(["s"] * 17) + "}").encode(),
    (_chat + '"stop_token_ids": [-5]}').encode(),
    (_chat + '"stop_token_ids": [99999999]}').encode(),
    (_chat + '"logit_bias": {"5": 100}}').encode(),
    (_chat + '"tools": [{"type": "function"}]}').encode(),
    (_chat + '"stream": "yes"}').encode(),
    (_chat + '"stream_options": 5}').encode(),
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',   # lone surrogate
    b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}',
    (_chat + '"stop": ["\\udc80"]}').encode(),
    b'{"model": "tiny", "prompt": "\\ud800x"}',
    b'{"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": null}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}',
    b'{"model": "tiny", "messages": [{"role": "user"}]}',
    b'{"model": "tiny", "messages": {"role": "user", "content": "x"}}',
    b'{"model": "tiny", "messages": "hi"}',
    b'{"model": 5, "messages": []}',
    json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}] * 600}).encode(),
    json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode(),
    json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}).encode(),  # context
    b'{"model": "tiny", "prompt": []}',
    b'{"model": "tiny", "prompt": [[]]}',
    b'{"model": "tiny", "prompt": [1.5]}',
    b'{"model": "tiny", "prompt": [true]}',
    b'{"model": "tiny", "prompt": "", "n": 8, "max_tokens": 255, "echo": true}',
    b'{"model": "tiny", "prompt": ["a","b","c"], "n": 3}',
    b'{"model": "tiny", "prompt": "a", "best_of": 3}',
    b'{"model": "tiny", "prompt": "a", "logprobs": 21}',
    b"null", b"[]", b'"x"', b"1", b"", b"\x00\xff\xfe", b"{" * 10, b'{"model": "tiny", "model": "tiny"',
]


def test_hostile_bodies(http, engine):
    assert http.get("/health").status_code == 200
    for body in HOSTILE:
        for path in ("/v1/chat/completions", "/v1/completions"):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:200])
            check_reply(r.status_code, r.headers, r.content)
    r = http.post("/v1/chat/completions", content=b" " * (10 << 20), headers={"content-type": "application/json"})
    check_reply(r.status_code, r.headers, r.content)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    _drained(engine)
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2}).status_code == 200
