"""Prometheus metrics with vLLM's names under this project's prefix (`llama3_deploy:`).

prometheus_client accepts ':' in metric names (the exposition format reserves it for recording rules, and
vLLM uses it the same way). Each app gets its own registry, so several apps in one process (tests) coexist.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the /metrics route

PREFIX = "llama3_deploy:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self._model = model_name
        self.running = Gauge(PREFIX + "num_requests_running", "Requests holding a slot", labels, registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a slot", labels, registry=r)
        self.slot_usage = Gauge(PREFIX + "slot_usage", "Fraction of slots in use (0..1)", labels, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between generated tokens", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Submit to finish, per choice", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefilled prompt tokens", labels, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", labels, registry=r)
        self.finished = Counter(PREFIX + "request_success", "Finished choices by finish reason",
                                labels + ["finished_reason"], registry=r)
        self.rejected = Counter(PREFIX + "request_rejected", "Requests refused (429 busy, 503 draining)",
                                labels + ["reason"], registry=r)

    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self._model).observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.labels(self._model).observe(seconds)

    def finish(self, seconds: float, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.e2e.labels(self._model).observe(seconds)
        self.finished.labels(self._model, reason).inc()
        self.prompt_tokens.labels(self._model).inc(prompt_tokens)
        self.generation_tokens.labels(self._model).inc(completion_tokens)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self._model, reason).inc()

    def render(self, stats) -> bytes:
        """The exposition text, with the gauges read from the engine now (no polling thread)."""
        self.running.labels(self._model).set(stats.running)
        self.waiting.labels(self._model).set(stats.waiting)
        self.slot_usage.labels(self._model).set(stats.running / stats.slots if stats.slots else 0.0)
        return generate_latest(self.registry)
