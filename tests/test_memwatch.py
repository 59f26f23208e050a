"""The build watchdog: peak memory of a command's process tree, and an out-of-memory stop that is a result."""
from __future__ import annotations

import sys

import pytest

from llama3_deploy.benchmarks.peers import artifacts as A
from llama3_deploy.benchmarks.peers.memwatch import run_watched, tree_anon_bytes

# A child that holds `mb` MiB of anonymous memory for `hold` seconds through a grandchild (the tree is watched).
HOLD = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
        "'import time; b = bytearray({mb} << 20); b[::4096] = b\"x\" * len(b[::4096]); time.sleep({hold})'])")


def _cmd(mb: int, hold: float) -> list[str]:
    return [sys.executable, "-c", HOLD.format(mb=mb, hold=hold)]


def test_peak_memory_of_a_grandchild_is_seen(tmp_path):
    w = run_watched(_cmd(200, 1.0), log=tmp_path / "log")
    assert w.returncode == 0 and w.oom is None
    assert w.peak_anon_bytes >= 200 << 20  # sampled over the tree: the grandchild's bytearray
    assert w.peak_rss_bytes >= 200 << 20   # the kernel's mark, grandchild included
    assert w.to_json()["peak_anon_gib"] >= 0.19


def test_over_the_cap_the_tree_is_stopped_and_the_figure_recorded(tmp_path):
    w = run_watched(_cmd(400, 30.0), log=tmp_path / "log", cap_bytes=150 << 20)
    assert w.oom is not None and w.oom.startswith("out of memory: stopped at ")
    assert "passed the cap of 0.1 GiB" in w.oom
    assert w.seconds < 20 and w.returncode != 0  # stopped, not waited out
    assert w.peak_anon_bytes > 150 << 20


def test_tree_of_a_missing_process_is_empty():
    assert tree_anon_bytes(2 ** 22 + 12345) == 0


def test_a_build_that_runs_out_of_memory_is_a_build_error_with_its_figures(tmp_path, monkeypatch):
    import functools

    from llama3_deploy.benchmarks.peers import memwatch
    monkeypatch.setattr(A, "run_watched", functools.partial(memwatch.run_watched, cap_bytes=150 << 20))
    with pytest.raises(A.BuildError, match="out of memory: stopped at") as e:
        A._run(_cmd(400, 30.0), tmp_path / "out", what="a peer's exporter", log=tmp_path / "log")
    assert e.value.memory["out_of_memory"] and e.value.memory["peak_anon_bytes"] > 150 << 20
    assert not (tmp_path / "out").exists()


def test_a_finished_build_reports_its_memory_and_keeps_it_in_the_marker(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", f"import os; os.makedirs({str(out)!r}); b = bytearray(50 << 20)"]
    info = A._run(cmd, out, what="a build", log=tmp_path / "log")
    assert info["memory"]["peak_rss_bytes"] >= 50 << 20 and info["memory"]["out_of_memory"] is None
    again = A._cached(out)
    assert again["cached"] and again["memory"] == info["memory"]


def test_prepare_only_with_a_name_writes_the_builds_report(tiny_checkpoint, tmp_path):
    import json

    from llama3_deploy.cli import main
    assert main(["bench", "--model", str(tiny_checkpoint), "--engines", "ort", "--ort-dtypes", "opt-int8",
                 "--prepare-only", "--work-dir", str(tmp_path / "w"), "--output-dir", str(tmp_path / "r"),
                 "--name", "builds"]) == 0
    doc = json.loads((tmp_path / "r" / "builds.json").read_text())
    assert doc["builds"]["ort-opt-int8"]["memory"]["peak_rss_bytes"] > 0 and doc["skipped"] == []
    md = (tmp_path / "r" / "builds.md").read_text()
    assert "| ort-opt-int8 | finished |" in md and "llama3_deploy export" in md


def test_builds_markdown_shows_an_out_of_memory_as_a_result():
    from llama3_deploy.benchmarks.report import builds_markdown
    oom = "out of memory: stopped at 21.30 GiB of anonymous memory, 95 s in (the machine had 0.98 GiB left)"
    doc = {"model": "random:meta-llama-3-8b-instruct", "dtype": "bfloat16", "weights": "seeded random",
           "machine": {"cpu_model": "x", "cpus": 2, "mem_total_gib": 23.5}, "started": "t", "wall_s": 1.0,
           "command": "llama3-deploy bench ...", "builds": {},
           "skipped": [{"engine": "optimum ORTModelForCausalLM", "reason": f"optimum-cli export onnx failed ({oom})",
                        "memory": {"seconds": 95.0, "peak_rss_gib": 22.1, "peak_anon_gib": 21.3,
                                   "out_of_memory": oom}}]}
    md = builds_markdown(doc)
    assert "| optimum ORTModelForCausalLM | **did not finish**: optimum-cli export onnx failed (out of memory" in md
    assert "| 95.0 | 22.1 | 21.3 |" in md
