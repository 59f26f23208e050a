"""The Ray Serve deployment (server/ray_serve.py) on a local single-node Ray cluster on the CPU: the same app
behind Ray's proxy, driven by the official openai client; greedy output equals Generator on the same prompt ids.

Ray starts in this process (`ray.init(num_cpus=2)`), Serve's proxy on a free loopback port; every wait is
bounded and the cluster is shut down at the end (about 20 s on 2 cores, most of it Ray starting).
"""
from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'llama3-deploy[ray]')")

from llama3_deploy.server.ray_serve import _args_model, app_builder, deployment_options  # noqa: E402

from .test_server import MSGS, is_openai_error  # noqa: E402

KEY = "ray-test-key"
APP = "llama3"
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bounded(fn, timeout_s: float, what: str):
    """Run fn in a daemon thread; fail (instead of hanging the suite) if it takes longer than timeout_s.
    Only for calls that talk to a running cluster, never for ray.init (see ray_server)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"{what} took longer than {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture(scope="module")
def ray_server(served_export):
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report attempts from the test cluster
    port = _free_port()
    # In this thread, not a helper thread: Ray starts its GCS and raylet with PR_SET_PDEATHSIG, which fires when
    # the *thread* that started them exits (seen: a ray.init in a short-lived thread lost its GCS a moment later).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _bounded(lambda: serve.start(http_options={"host": "127.0.0.1", "port": port}), 60, "serve.start")
        app = app_builder({"model": str(served_export), "served_model_name": "tiny", "slots": "4",
                           "max_waiting": "8", "max_replicas": "2", "api_key": KEY, "drain_timeout": "5"})
        _bounded(lambda: serve.run(app, name=APP, route_prefix="/"), START_TIMEOUT_S, "serve.run")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            _bounded(serve.shutdown, 60, "serve.shutdown")
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(ray_server):
    return openai.OpenAI(base_url=ray_server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def gen(served_export):
    from llama3_deploy.runtime import Generator
    return Generator(served_export)


def _greedy(gen, ids, n):
    from llama3_deploy.runtime.sampling import SamplingParams
    return gen.generate(ids, SamplingParams(max_new_tokens=n))


# ---- pure: the options Ray is given ---------------------------------------------------------------------------


def test_deployment_options_follow_slots_and_device(served_export):
    args = _args_model().model_validate({"model": str(served_export), "slots": "8", "max_waiting": "16"})
    opts = deployment_options(args)
    assert opts["max_ongoing_requests"] == 24 and opts["autoscaling_config"]["target_ongoing_requests"] == 8
    assert opts["ray_actor_options"] == {"num_cpus": 1} and opts["graceful_shutdown_timeout_s"] == 40.0
    gpu = deployment_options(args.model_copy(update={"device": "cuda:1", "threads": 4}))
    assert gpu["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
    with pytest.raises(ValueError):
        deployment_options(args.model_copy(update={"min_replicas": 3, "max_replicas": 2}))
    with pytest.raises(Exception, match="slot"):  # a typo is refused, not ignored
        _args_model().model_validate({"model": "x", "slot": "8"})


# ---- the app behind Ray's proxy ----------------------------------------------------------------------------


def test_ray_chat_and_completion_equal_generator(client, served_export, gen):
    from llama3_deploy.runtime.chat import ChatFormat
    chat = ChatFormat.from_dir(served_export)
    ids = chat.encode_dialog(MSGS)
    want = _greedy(gen, ids, 10)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want.generated_ids) and r.object == "chat.completion"
    assert r.model == "tiny" and r.id.startswith("chatcmpl-")
    want = _greedy(gen, [5, 9, 33], 8)
    c = client.completions.create(model="tiny", prompt=[5, 9, 33], max_tokens=8, temperature=0, logprobs=2)
    assert c.choices[0].text == want.text and len(c.choices[0].logprobs.tokens) == len(want.generated_ids)


def test_ray_streams_equal_whole(client, served_export, gen, ray_server):
    from llama3_deploy.runtime.chat import ChatFormat
    ids = ChatFormat.from_dir(served_export).encode_dialog(MSGS)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _greedy(gen, ids, 6).text and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(ids)
    stream = client.completions.create(model="tiny", prompt=[5, 9, 33], max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == _greedy(gen, [5, 9, 33], 8).text
    raw = httpx.post(ray_server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"model": "tiny", "prompt": "abc", "max_tokens": 3, "stream": True}).text
    assert raw.endswith("data: [DONE]\n\n")


def test_ray_auth_health_and_errors_are_the_apps(ray_server, client):
    assert httpx.get(ray_server + "/health", timeout=30).status_code == 200  # public, as under uvicorn
    r = httpx.get(ray_server + "/v1/models", timeout=30)
    assert is_openai_error(r, 401) and r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=ray_server + "/v1", api_key="wrong", max_retries=0, timeout=30).models.list()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    auth = {"Authorization": f"Bearer {KEY}"}
    is_openai_error(httpx.post(ray_server + "/v1/chat/completions", headers=auth, timeout=30,
                               json={"model": "nope", "messages": MSGS}), 404, "model_not_found")
    is_openai_error(httpx.post(ray_server + "/v1/completions", headers=auth, timeout=30,
                               json={"model": "tiny", "prompt": "x", "max_tokens": 256}), 400,
                    "context_length_exceeded")
    assert "llama3_deploy:generation_tokens_total" in httpx.get(ray_server + "/metrics", headers=auth,
                                                                timeout=30).text


def test_ray_concurrent_requests_and_applied_options(client, gen, ray_server):
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve
    prompts = [[5, 9, 33 + k] for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=12,
                                                                  temperature=0).choices[0].text, prompts))
    assert texts == [_greedy(gen, p, 12).text for p in prompts]
    status = serve.status().applications[APP]
    assert status.status == "RUNNING"
    assert status.deployments["llama3-deploy"].replica_states.get("RUNNING", 0) >= 1
    try:
        from ray.serve.context import _get_global_client
        details = _get_global_client().get_serve_details()
    except (ImportError, AttributeError) as e:  # private API: the pure test above still checks the options
        pytest.skip(f"Serve details are not readable in this Ray version: {e}")
    config = details["applications"][APP]["deployments"]["llama3-deploy"]["deployment_config"]
    assert config["max_ongoing_requests"] == 12 and config["max_queued_requests"] == 64
    assert config["autoscaling_config"]["target_ongoing_requests"] == 4
    assert config["autoscaling_config"]["max_replicas"] == 2
    assert config["ray_actor_options"]["num_cpus"] == 1 and not config["ray_actor_options"].get("num_gpus")
