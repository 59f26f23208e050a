"""The OpenAI-compatible server (server/): the official openai client against uvicorn on loopback, errors in
OpenAI's shape, limits, auth, overload, disconnects, metrics; on a fake engine, then on the real engine."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from llama3_deploy.server.app import create_app  # noqa: E402

from .server_helpers import FakeEngine, ServerThread, build_tokenizer  # noqa: E402

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi <|eot_id|> twice"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("srvtok"))


@pytest.fixture(scope="module")
def fake(tok_dir):
    # Room for the 16 concurrent clients of test_concurrent_streams_fake even when none finishes before the last
    # arrives (a loaded machine): 4 slots + 16 waiting. Overload has its own engine (test_overload_...).
    engine = FakeEngine(tok_dir, slots=4, max_waiting=16).start()
    yield engine
    engine.shutdown(drain_timeout_s=0)


@pytest.fixture(scope="module")
def server(fake):
    with ServerThread(create_app(fake, model_name="tiny", shutdown_engine=False)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def is_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def _sse(text: str) -> list:
    out = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    return [x if x == "[DONE]" else json.loads(x) for x in out]


# ---- the openai client, fake engine -----------------------------------------------------------------------


def test_chat_completion_and_usage(client, fake):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=7, temperature=0)
    ids = fake.chat.encode_dialog(MSGS)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 7 and r.usage.total_tokens == len(ids) + 7
    assert r.choices[0].message.content == fake.tokenizer.decode(fake.expected_ids(ids, 7))
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")


def test_user_control_token_is_plain_text(client, fake):
    """"<|eot_id|>" typed by a user is counted as its characters, never as the control token."""
    eot = fake.tokenizer.token_to_id("<|eot_id|>")
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=1)
    plain = fake.chat.encode_dialog(MSGS)
    assert r.usage.prompt_tokens == len(plain)
    assert plain.count(eot) == 2  # the template's own two, after system and user; none from the content
    specials = fake.tokenizer.encode_with_specials(MSGS[1]["content"])
    assert eot in specials and eot not in fake.tokenizer.encode(MSGS[1]["content"])


def test_completion_text_and_token_prompts(client, fake):
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0)
    ids = fake.tokenizer.encode("Hello there", bos=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 5
    assert r.choices[0].text == fake.tokenizer.decode(fake.expected_ids(ids, 5))
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    r3 = client.completions.create(model="tiny", prompt=["a", "b c"], max_tokens=2, n=2)
    assert [c.index for c in r3.choices] == [0, 1, 2, 3]
    tok = fake.tokenizer
    assert r3.usage.prompt_tokens == len(tok.encode("a", bos=True)) + len(tok.encode("b c", bos=True))


def test_chat_stream_role_usage_done(client, fake, server):
    stream = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(fake.chat.encode_dialog(MSGS))
    assert chunks[-1].usage.completion_tokens == 6
    whole = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0)
    assert text == whole.choices[0].message.content
    raw = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "max_tokens": 3,
                                                                 "stream": True}).text
    assert raw.endswith("data: [DONE]\n\n")


def test_completion_stream(client):
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, stream=True))
    whole = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[0].object == "text_completion"


def test_n_seed_stop_and_penalties(client, fake):
    a = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, n=3, seed=11, temperature=0.8,
                                       presence_penalty=0.5, frequency_penalty=-0.5, top_p=0.9)
    b = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, n=3, seed=11, temperature=0.8,
                                       presence_penalty=0.5, frequency_penalty=-0.5, top_p=0.9)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) == 3  # seeds derived per choice differ
    assert a.usage.completion_tokens == 15
    full = client.completions.create(model="tiny", prompt="xyz", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:6]
    cut = client.completions.create(model="tiny", prompt="xyz", max_tokens=12, temperature=0, stop=[stop, "zzzz"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[:full.index(stop)]
    extra = client.completions.create(model="tiny", prompt="xyz", max_tokens=3, temperature=0,
                                      extra_body={"top_k": 5, "repetition_penalty": 1.1, "stop_token_ids": [3]})
    assert extra.choices[0].finish_reason == "length"


def test_logprobs_shapes(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.bytes for c in content)
    assert "".join(bytes(c.bytes).decode() for c in content) == r.choices[0].message.content
    c = client.completions.create(model="tiny", prompt="hi", max_tokens=3, logprobs=1)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == c.choices[0].text
    none = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").status_code == 200
    is_openai_error(httpx.get(server.url + "/v1/models/other"), 404, "model_not_found")
    text = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket", "prompt_tokens_total",
                 "generation_tokens_total", "slot_usage"):
        assert f"llama3_deploy:{name}" in text, name


# ---- errors and limits --------------------------------------------------------------------------------------


def test_errors_in_openai_shape(server, client):
    url = server.url
    is_openai_error(httpx.post(url + "/v1/chat/completions", json={"model": "nope", "messages": MSGS}), 404,
                    "model_not_found")
    err = is_openai_error(httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS,
                                                                         "temperature": -1}), 400)
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    is_openai_error(httpx.post(url + "/v1/chat/completions", content=b"{not json"), 400)
    is_openai_error(httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "n": 9}), 400)
    is_openai_error(httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [999999]}), 400)
    is_openai_error(httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 2000,
                                                              "max_tokens": 10}), 400, "context_length_exceeded")
    is_openai_error(httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 256}),
                    400, "context_length_exceeded")
    is_openai_error(httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS,
                                                                   "stop": [""]}), 400)
    is_openai_error(httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS,
                                                                   "top_logprobs": 2}), 400)
    is_openai_error(httpx.get(url + "/v1/chat/completions"), 405, "method_not_allowed")
    is_openai_error(httpx.get(url + "/v1/nothing"), 404, "not_found")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSGS, temperature=5)


def test_body_and_header_limits(server):
    url = server.url + "/v1/completions"
    big = b"x" * (10 << 20)
    t = time.monotonic()
    try:
        r = httpx.post(url, content=big, headers={"content-type": "application/json"})
        is_openai_error(r, 413, "request_too_large")
    except httpx.TransportError:  # the server may answer and close before the upload ends
        pass

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(10):
            yield b" " * (1 << 20)
    is_openai_error(httpx.post(url, content=chunks(), headers={"content-type": "application/json"}), 413)
    is_openai_error(httpx.get(server.url + "/v1/models", headers={"x-big": "y" * (20 << 10)}), 431)
    assert time.monotonic() - t < 10


def _raw(port: int, data: bytes, timeout=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:  # the server stopped reading and closed: a refusal too
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_huge_header_is_refused_quickly_with_bounded_memory(server):
    """CVE-2025-48956: a 10 MB header gets 400/431 or a closed connection, fast, without buffering it."""
    before, t = _rss(), time.monotonic()
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: "
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(head)
        sent = 0
        try:
            block = b"a" * (1 << 16)
            while sent < (10 << 20):
                s.sendall(block)
                sent += len(block)
        except OSError:
            pass
        try:
            reply = s.recv(4096)
        except OSError:
            reply = b""
    assert reply == b"" or reply.split(b" ")[1] in (b"400", b"431"), reply[:100]
    assert time.monotonic() - t < 10 and _rss() - before < 8 << 20
    assert httpx.get(server.url + "/health").status_code == 200


def test_overload_gets_fast_429_and_n_is_all_or_nothing(tok_dir):
    engine = FakeEngine(tok_dir, slots=1, max_waiting=1, step_s=0.01).start()
    try:
        with ServerThread(create_app(engine, model_name="tiny")) as s:
            body = {"model": "tiny", "prompt": "a", "max_tokens": 200, "stream": True}
            with httpx.Client(timeout=30) as c, c.stream("POST", s.url + "/v1/completions", json=body) as held:
                next(held.iter_lines())
                t = time.monotonic()
                r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False, "n": 3})
                is_openai_error(r, 429, "rate_limit_exceeded")
                assert int(r.headers["retry-after"]) >= 1 and time.monotonic() - t < 1.0
            deadline = time.monotonic() + 5
            while engine.stats().running or engine.stats().waiting:  # the refused n=3 kept nothing
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        engine.shutdown(drain_timeout_s=0)


def test_draining_and_dead_engine_get_503(tok_dir):
    engine = FakeEngine(tok_dir).start()
    app = create_app(engine, model_name="tiny")
    with ServerThread(app) as s:
        app.state.draining = True
        is_openai_error(httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS}), 503)
        is_openai_error(httpx.get(s.url + "/health"), 503)
        app.state.draining = False
        engine.fail_after = 2
        events = _sse(httpx.post(s.url + "/v1/chat/completions",
                                 json={"model": "tiny", "messages": MSGS, "stream": True}).text)
        assert "error" in events[-2] and events[-1] == "[DONE]"
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS})
        is_openai_error(r, 500)
        engine.fail_after = None
        engine.shutdown(drain_timeout_s=0)  # a stopped (or dead) loop: unhealthy, and submit refuses
        is_openai_error(httpx.get(s.url + "/health"), 503)
        is_openai_error(httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS}), 503)


def test_api_key_cannot_be_bypassed(tok_dir):
    """GHSA-94f4-hr76-p5j6: no Host header, query, `//`, `..` or percent-encoding skips the key."""
    engine = FakeEngine(tok_dir).start()
    with ServerThread(create_app(engine, model_name="tiny", api_key="s3cret")) as s:
        def status(path, host="127.0.0.1", auth=None):
            extra = f"Authorization: {auth}\r\n" if auth else ""
            reply = _raw(s.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
            return int(reply.split(b" ")[1])
        for path, host in [("/v1/models", "127.0.0.1"), ("/v1/models", "localhost/health"),
                           ("/v1/models", "x?/health"), ("/v1/models", "x/health?"), ("//v1/models", "h"),
                           ("/v1/models?x=/health", "h"), ("/health/../v1/models", "h"), ("/%76%31/models", "h"),
                           ("/v1/%6Dodels", "h"), ("/%68ealth", "h"), ("/health/", "h"), ("/metrics", "h"),
                           ("/v1/models#/health", "h"), ("/openapi.json", "h")]:
            assert status(path, host) == 401, (path, host)
            assert status(path, host, "Bearer wrong") == 401, (path, host)
        assert status("/health") == 200
        assert status("/v1/models", auth="Bearer s3cret") == 200 and status("/metrics", auth="Bearer s3cret") == 200
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).usage.completion_tokens == 2


def test_disconnects_free_slots(server, fake):
    """100 clients that hang up mid-stream leave no slot held and no growing memory."""
    before = _rss()
    _hang_up(server.url + "/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 200,
                                                   "stream": True}, times=100)
    _wait_idle(fake)
    assert _rss() - before < 50 << 20


def _hang_up(url: str, body: dict, *, times: int) -> None:
    """Start a stream and close the connection after its first line, `times` times."""
    with httpx.Client(timeout=30) as c:
        for _ in range(times):
            with c.stream("POST", url, json=body) as r:
                next(r.iter_lines())
            # leaving the block closes this connection mid-stream


def _wait_idle(engine, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.stats().running or engine.stats().waiting:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


def test_concurrent_streams_fake(server, fake):
    _concurrent(server, fake, 16, lambda ids: fake.tokenizer.decode(fake.expected_ids(ids, 12)))


def _concurrent(server, engine, clients: int, expected):
    """`clients` streaming chat requests at once; each output equals the request served alone."""
    results: dict[int, str] = {}
    failures: list[str] = []

    def one(k: int):
        try:
            run(k)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            failures.append(repr(e))

    def run(k: int):
        msgs = [{"role": "user", "content": f"question number {k}"}]
        with httpx.Client(timeout=120) as c:
            r = c.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 12,
                                                                  "temperature": 0, "stream": True})
        assert r.status_code == 200, r.text[:300]
        events = _sse(r.text)
        assert events[-1] == "[DONE]", r.text[-300:]
        results[k] = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures and len(results) == clients, failures[:3]
    for k in range(clients):
        ids = engine.chat.encode_dialog([{"role": "user", "content": f"question number {k}"}])
        assert results[k] == expected(ids), k
    assert engine.stats().max_rows_in_a_step > 1


# ---- the real engine on a tiny optimized export ---------------------------------------------------------------


@pytest.fixture(scope="module")
def real(served_export):
    from llama3_deploy.runtime.engine import Engine
    engine = Engine(served_export, slots=4, max_waiting=16, prefill_chunk=16).start()
    with ServerThread(create_app(engine, model_name="tiny", drain_timeout_s=5)) as s:
        yield s, engine


def test_real_engine_greedy_equals_generator(real, served_export):
    from llama3_deploy.runtime import Generator
    from llama3_deploy.runtime.sampling import SamplingParams
    server, engine = real
    gen = Generator(served_export)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    ids = engine.chat.encode_dialog(MSGS)
    want = gen.generate(ids, SamplingParams(max_new_tokens=10))
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want.generated_ids)
    c = client.completions.create(model="tiny", prompt=[5, 9, 33], max_tokens=8, temperature=0, logprobs=2)
    want = gen.generate([5, 9, 33], SamplingParams(max_new_tokens=8))
    assert c.choices[0].text == want.text and len(c.choices[0].logprobs.tokens) == len(want.generated_ids)
    stream = client.completions.create(model="tiny", prompt=[5, 9, 33], max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == want.text


def test_real_engine_concurrent_streams(real, served_export):
    from llama3_deploy.runtime import Generator
    from llama3_deploy.runtime.sampling import SamplingParams
    server, engine = real
    gen = Generator(served_export)
    _concurrent(server, engine, 16, lambda ids: gen.generate(ids, SamplingParams(max_new_tokens=12)).text)


def test_real_engine_disconnects_free_slots(real):
    server, engine = real
    _hang_up(server.url + "/v1/completions", {"model": "tiny", "prompt": [5, 9, 33], "max_tokens": 200,
                                              "stream": True}, times=20)
    _wait_idle(engine)
    assert engine.stats().alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_then_exits_0(served_export):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "llama3_deploy", "serve", "--model", str(served_export),
                             "--port", str(port), "--slots", "2", "--drain-timeout", "20", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        name = served_export.name
        # 4 choices x 200 tokens on 2 slots: generation is still running when SIGTERM arrives
        body = {"model": name, "prompt": [5, 9, 33], "max_tokens": 200, "temperature": 0, "stream": True, "n": 4}
        with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError):  # the listener is closed: new connections are refused
                httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=2)
            rest = [first, *lines]
        events = [x for x in rest if x.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        finished = {c["index"]: c["finish_reason"] for e in events[:-1] for c in json.loads(e[6:])["choices"]
                    if c["finish_reason"]}
        assert finished.keys() == {0, 1, 2, 3} and set(finished.values()) <= {"stop", "length"}, finished
        assert proc.wait(30) == 0, proc.communicate()[1].decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
