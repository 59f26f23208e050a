"""Run a build command and record its memory: the kernel's peak RSS for it, the peak anonymous memory of its
process tree, and an out-of-memory stop that leaves the rest of the machine alive.

A peer's exporter that needs more memory than the machine has is a result, not a crash: the watchdog samples
the tree's anonymous memory (what cannot be dropped; mmapped checkpoint pages can) and the machine's
MemAvailable a few times a second, and kills the whole tree (its own session) before the kernel's OOM killer
would pick a victim, perhaps another process. The figure it died at is the anonymous memory then.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
MIN_AVAILABLE = 1 << 30  # stop the tree when the machine has less than this left (MemAvailable)
POLL_S = 0.2


@dataclasses.dataclass
class Watched:
    returncode: int
    seconds: float
    peak_rss_bytes: int    # the kernel's high-water mark for the child and the descendants it waited for
    peak_anon_bytes: int   # the largest sampled sum of RssAnon over the process tree
    oom: str | None        # why the watchdog stopped it, or None

    def to_json(self) -> dict:
        return {"returncode": self.returncode, "seconds": round(self.seconds, 1),
                "peak_rss_bytes": self.peak_rss_bytes, "peak_rss_gib": round(self.peak_rss_bytes / (1 << 30), 2),
                "peak_anon_bytes": self.peak_anon_bytes, "peak_anon_gib": round(self.peak_anon_bytes / (1 << 30), 2),
                "out_of_memory": self.oom}


def meminfo(field: str = "MemAvailable") -> int | None:
    """A /proc/meminfo figure in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tree_anon_bytes(root: int) -> int:
    """Sum of RssAnon over `root` and its descendants (read from /proc; processes may vanish meanwhile)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def run_watched(cmd: list[str], *, log: Path, env: dict | None = None, cap_bytes: int | None = None,
                min_available: int = MIN_AVAILABLE) -> Watched:
    """Run `cmd` (output to `log`), stopping its tree when its anonymous memory passes `cap_bytes` or the
    machine's MemAvailable falls under `min_available`."""
    stop = threading.Event()
    state = {"peak": 0, "oom": None}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.perf_counter()

        def watch() -> None:
            while not stop.wait(POLL_S):
                anon = tree_anon_bytes(proc.pid)
                state["peak"] = max(state["peak"], anon)
                avail = meminfo()
                why = None
                if cap_bytes is not None and anon > cap_bytes:
                    why = f"its memory passed the cap of {cap_bytes / (1 << 30):.1f} GiB"
                elif avail is not None and avail < min_available:
                    why = f"the machine had {avail / (1 << 30):.2f} GiB left"
                if why:
                    state["oom"] = (f"out of memory: stopped at {anon / (1 << 30):.2f} GiB of anonymous memory, "
                                    f"{time.perf_counter() - t0:.0f} s in ({why}; "
                                    f"{(meminfo('MemTotal') or 0) / (1 << 30):.1f} GiB machine)")
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            stop.set()
            watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    oom = state["oom"]
    if oom is None and proc.returncode == -signal.SIGKILL:
        oom = "killed by SIGKILL (the kernel's out-of-memory killer, or someone else)"
    return Watched(proc.returncode, seconds, usage.ru_maxrss * 1024, state["peak"], oom)
