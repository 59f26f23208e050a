"""The GPU check (benchmarks/gpu.py) on the CPU: both phases on a tiny model with the command line the device
runs, the staged-wheel install, the export writer on onnx-ir 1.0, pausing the background preparation; the same command
under the device-mirroring virtual environment (slow); the real thing where a CUDA device is present (gpu)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from llama3_deploy.benchmarks import gpu, gpu_setup

ROOT = Path(__file__).resolve().parent.parent
MIRROR_PYTHON = ROOT / ".venv-device" / "bin" / "python"
# The device's command line on a tiny model, sized to run in seconds on two cores.
SMALL_RUN = ["--quick", "--device", "cpu", "--model", "tiny", "--small", "tiny", "--dtype", "float32",
             "--new-tokens", "16", "--long-prompt-len", "256", "--long-new-tokens", "4", "--batches", "2",
             "--reps", "2"]
OUT_FILES = {"gpu-check.json", "gpu-check.md", "gpu-check.png", "gpu-check-bench.log", "gpu-check-prepare.log"}


def _check_outputs(out: Path, work: Path) -> dict:
    files = {p.name for p in out.iterdir()}
    assert files == OUT_FILES and len(files) <= 8  # within the device tool's limits on returned files
    assert all((out / f).stat().st_size < (16 << 20) for f in files)
    doc = json.loads((out / "gpu-check.json").read_text())
    assert doc["complete"] and not doc["errors"], doc["errors"]
    assert doc["correctness"]["ok"] is True
    for key in ("small-portable-fp32: device equals cpu", "small-opt-fp32: device equals cpu",
                "small-opt-fp16: graph replay equals uncaptured", "small-opt-fp16: read-backs",
                "small-opt-fp16: node placement"):
        assert doc["correctness"][key]["ok"] is True, key
    assert doc["correctness"]["small-opt-fp16: read-backs"]["dtypes"] == ["int64"]
    assert doc["floor"]["bandwidth"]["bytes_per_s"] > 0 and doc["floor"]["matmul"]["flops_per_s"] > 0
    cells = {(r["engine"], r["batch"], r["prompt_len"]) for r in doc["results"]}
    assert cells == {("ort", 1, 128), ("ort", 1, 256), ("torch-eager", 1, 128), ("torch-eager", 1, 256),
                     ("ort", 2, 128), ("torch-eager", 2, 128), ("ort-int4", 1, 128), ("ort-int4", 1, 256)}
    for r in doc["results"]:
        assert r["ttft_ms"] > 0 and r["tpot_ms"]["p90"] >= r["tpot_ms"]["p50"] > 0
        assert r["floor"]["tpot_floor_ms"] > 0 and r["floor"]["weight_bytes_per_step"] > 0
        assert r["ratio"]["tpot_to_eager"] > 0 and len(r["raw"]["step_ms"]) == 2
    assert [t["limit"] for t in doc["targets"]] == [1.25, 0.8, 1.0, 2.0]
    assert all(t["value"] is not None for t in doc["targets"])
    assert doc["versions"]["onnxruntime providers"] and doc["source"]["sources_sha256"]
    assert doc["prepare"]["state"] == "done"
    assert {k: s["state"] for k, s in doc["prepare"]["steps"].items()} == {
        k: "done" for k in ("small-opt-fp32", "small-opt-fp16", "small-portable-fp32", "model-opt", "model-opt-int4")}
    md = (out / "gpu-check.md").read_text()
    assert "| engine |" in md and "## Targets" in md and "seeded random" in md
    assert "model-opt: done" in (work / "prepare.log").read_text()
    return doc


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """Both phases in this process, one after the other, as the device's calls 1 and 6 run them."""
    root = tmp_path_factory.mktemp("gpu-check")
    work, out = root / "work", root / "out"
    assert gpu.main(["--phase", "prepare", *SMALL_RUN, "--work", str(work)]) == 0
    rc = gpu.main(["--phase", "bench", *SMALL_RUN, "--work", str(work), "--out", str(out)])
    return rc, work, out


def test_both_phases_on_the_cpu(cpu_run):
    rc, work, out = cpu_run
    assert rc == 0
    doc = _check_outputs(out, work)
    assert doc["protocol"]["reps"] == 2 and doc["machine"]["cpu"]
    st = {p.name: json.loads(p.read_text()) for p in work.glob("prepare-status-*.json")}
    assert st["prepare-status-model.json"]["pid"] == os.getpid() != st["prepare-status-small.json"]["pid"]
    assert set(st["prepare-status-small.json"]["steps"]) == {"small-opt-fp32", "small-opt-fp16", "small-portable-fp32"}


def test_prepare_reuses_finished_exports(cpu_run, capsys):
    _, work, _ = cpu_run
    assert gpu.main(["--phase", "prepare", *SMALL_RUN, "--work", str(work)]) == 0
    assert capsys.readouterr().out.count("already there") == 2  # the 8B steps; the small ones in the child
    assert (work / "prepare.log").read_text().count("already there") == 5


def test_bench_budget_skips_and_still_reports(cpu_run, tmp_path):
    _, work, _ = cpu_run
    out = tmp_path / "out"
    rc = gpu.main(["--phase", "bench", *SMALL_RUN, "--work", str(work), "--out", str(out), "--budget-s", "1"])
    doc = json.loads((out / "gpu-check.json").read_text())
    assert rc == 1 and not doc["complete"] and doc["skipped"]  # a short budget records what it left out
    assert (out / "gpu-check.md").read_text().count("skipped") >= 1


def _fake_wheel(tmp_path: Path) -> Path:
    wheel = tmp_path / "fakeort-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fakeort/__init__.py", "VALUE = 42\n")
        z.writestr("fakeort-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakeort\nVersion: 0.1\n")
        z.writestr("fakeort-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fakeort-0.1.dist-info/RECORD", "")
    return wheel


def test_staged_wheel_is_joined_named_and_installed(tmp_path, monkeypatch):
    data = _fake_wheel(tmp_path).read_bytes()
    root = tmp_path / "whl"
    for k, lo in enumerate(range(0, len(data), 300)):  # parts as the stage script splits them
        (root / f"part-{k}").mkdir(parents=True)
        (root / f"part-{k}" / f"ort-gpu.{k:02d}").write_bytes(data[lo:lo + 300])
    monkeypatch.setattr(sys, "path", list(sys.path))
    info = gpu_setup.install_staged_wheel(root, root / "site", lambda *_: None)
    assert info["installed"] is True and info["returncode"] == 0 and len(info["parts"]) > 2
    assert sys.path[0] == str(root / "site") and (root / "site" / "fakeort" / "__init__.py").is_file()
    assert gpu_setup.install_staged_wheel(root, root / "site", lambda *_: None)["installed"] == "already there"
    none = gpu_setup.install_staged_wheel(tmp_path / "nothing", tmp_path / "site", lambda *_: None)
    assert none["installed"] is False and "stage-ort-gpu.sh" in none["reason"]


def test_export_writer_drops_options_an_older_onnx_ir_lacks(monkeypatch):
    """onnx-ir 1.0 (the device's) has no max_workers / max_in_flight_bytes / alignment in ir.save."""
    import onnx_ir

    from llama3_deploy.export import onnx_export

    def old_save(model, path, format=None, external_data=None, size_threshold_bytes=256, callback=None):
        pass
    monkeypatch.setattr(onnx_ir, "save", old_save)
    assert onnx_export._writer_options() == {}
    monkeypatch.undo()
    assert set(onnx_export._writer_options()) <= {"max_workers", "max_in_flight_bytes", "alignment"}


def test_pause_prepare_stops_and_resumes_the_background_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status = tmp_path / "prepare-status-model.json"
        gpu_setup.write_json(status, {"pid": proc.pid, "state": "running", "current": "model-opt-int4"})
        gpu_setup.write_json(tmp_path / "prepare-status-small.json", {"pid": 2 ** 22 + 7, "state": "running"})
        assert gpu_setup.prepare_state(tmp_path)["running"] == [
            {"pid": proc.pid, "current": "model-opt-int4", "state": "running"}]
        state = lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0]
        with gpu_setup.pause_prepare(tmp_path, lambda *_: None) as paused:
            time.sleep(0.2)
            assert paused and state() == "T"
        time.sleep(0.2)
        assert state() != "T" and gpu_setup.alive(proc.pid)
        gpu_setup.write_json(status, {"pid": proc.pid, "state": "done"})
        with gpu_setup.pause_prepare(tmp_path, lambda *_: None) as paused:
            assert not paused
    finally:
        proc.kill()
        proc.wait()
    assert not gpu_setup.alive(proc.pid)


@pytest.mark.slow
@pytest.mark.skipif(not MIRROR_PYTHON.is_file(), reason="no .venv-device (the device's versions; see "
                    "benchmarks/results/gpu-check-cpu-side.md for how it is made)")
def test_device_versions_both_phases_as_on_the_device(tmp_path):
    """The device's flow under its versions (transformers 5, onnx-ir 1.0, onnxruntime 1.30): prepare started in
    its own session in the background, bench at once after it (it waits for the exports)."""
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [str(MIRROR_PYTHON), "-m", "llama3_deploy.benchmarks.gpu"]
    work.mkdir()
    with open(work / "prepare.out", "w") as f:
        prep = subprocess.Popen([*cmd, "--phase", "prepare", *SMALL_RUN, "--work", str(work)], stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=ROOT)
    try:
        bench = subprocess.run([*cmd, "--phase", "bench", *SMALL_RUN, "--work", str(work), "--out", str(out)],
                               capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert prep.wait(timeout=300) == 0
    finally:
        prep.kill()
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    doc = _check_outputs(out, work)
    assert doc["versions"]["transformers"].startswith("5.") and doc["versions"]["onnx-ir"].startswith("1.0")
    assert "| engine |" in bench.stdout  # the table is printed last


@pytest.mark.gpu
def test_gpu_check_on_cuda(tmp_path):
    """Where a CUDA device and onnxruntime's CUDA build are present: the check on the small model, CUDA graphs
    on and off against PyTorch eager, correctness items all ok."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device (none on this machine)")
    rc = gpu.main(["--phase", "all", "--quick", "--device", "cuda", "--model", "small", "--small", "small",
                   "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--no-int4",
                   "--ort-parts", str(tmp_path / "no-parts")])  # the installed onnxruntime-gpu, no staged wheel
    doc = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert rc == 0 and doc["correctness"]["ok"] is True
    assert {r["engine"] for r in doc["results"]} == {"ort-graph", "ort", "torch-eager"}
