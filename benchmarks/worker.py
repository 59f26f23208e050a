"""One engine in its own process, driven by the harness over a line-per-message JSON protocol.

    python -m llama3_deploy.benchmarks.worker '{"kind": "ort", "path": "...", "device": "cpu"}'

The harness sends {"op": "run", "prompts": [[ids]], "new_tokens": N} and {"op": "quit"}; the worker
answers one JSON line each on its original stdout (engines' own prints go to stderr). Peak host RSS
is attributable because the process holds nothing but this engine: the kernel's high-water mark
(VmHWM) is reset before each run (/proc/self/clear_refs "5") and read after it, and the lifetime
peak (load included) is the largest mark seen. Runs in any environment with numpy (peer venvs too).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class RssTracker:
    """Peak RSS per run and over the process's life, from the kernel's high-water mark."""

    def __init__(self):
        self.resettable = os.path.exists("/proc/self/clear_refs")
        self.lifetime = 0

    def _hwm(self) -> int:
        kib = _status_kib("VmHWM")
        if kib is None:  # not Linux: fall back to getrusage (never reset)
            import resource
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib * 1024

    def reset(self) -> None:
        """Fold the current mark into the lifetime peak, then restart the mark at the current RSS."""
        self.lifetime = max(self.lifetime, self._hwm())
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.resettable = False

    def peak(self) -> int:
        """The mark since the last reset (the lifetime mark where resetting is impossible)."""
        value = self._hwm()
        self.lifetime = max(self.lifetime, value)
        return value

    @staticmethod
    def current() -> int | None:
        kib = _status_kib("VmRSS")
        return kib * 1024 if kib is not None else None


def device_memory(pid: int) -> dict:
    """This process's GPU memory: torch's peak reservation where torch runs on CUDA, and the driver's
    per-process figure from nvidia-smi (ONNX Runtime's arena only grows, so after a run it is the peak)."""
    out: dict = {}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        out["torch_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    if shutil.which("nvidia-smi"):
        try:
            text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=20).stdout
            for line in text.splitlines():
                p, _, mib = line.partition(",")
                if p.strip() == str(pid):
                    out["nvidia_smi_used_bytes"] = int(float(mib)) << 20
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    values = [v for k, v in out.items() if k != "torch_max_allocated_bytes"]
    out["peak_device_bytes"] = max(values) if values else None
    return out


def _reset_device_peak() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the engines print goes to the log, not into the protocol

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    rss = RssTracker()
    cuda = str(spec.get("device", "cpu")).startswith("cuda")
    try:
        from llama3_deploy.benchmarks.engines import make_engine
        t0 = time.perf_counter()
        engine = make_engine(spec)
        load_s = time.perf_counter() - t0
    except Exception as e:  # report why this engine cannot run; the harness records it
        send({"event": "error", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]})
        return 1
    send({"event": "ready", "pid": os.getpid(), "name": engine.name, "version": engine.version,
          "dtype": getattr(engine, "dtype", spec.get("dtype")), "load_s": load_s,
          "rss_after_load_bytes": rss.current(), "peak_rss_load_bytes": rss.peak(),
          "rss_resettable": rss.resettable})
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg["op"] == "quit":
            break
        if msg["op"] != "run":
            send({"event": "error", "error": f"unknown op {msg['op']!r}"})
            continue
        rss.reset()
        _reset_device_peak()
        try:
            timing = engine.run(msg["prompts"], int(msg["new_tokens"]))
        except Exception as e:
            send({"event": "error", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]})
            continue
        reply = {"event": "result", "ttft_ms": timing.ttft_ms, "step_ms": timing.step_ms, "tokens": timing.tokens,
                 "peak_rss_bytes": rss.peak(), "rss_bytes": rss.current()}
        if cuda:
            reply["device_memory"] = device_memory(os.getpid())
        send(reply)
    send({"event": "bye", "peak_rss_lifetime_bytes": max(rss.lifetime, rss.peak())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
