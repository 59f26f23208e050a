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


@pytest.fixture(scope="module")
def int4_only_work(tmp_path_factory):
    """The prepare phase with --int4-only in a fresh folder: the small models and the INT4 export, nothing else."""
    work = tmp_path_factory.mktemp("gpu-check-int4") / "work"
    assert gpu.main(["--phase", "prepare", *SMALL_RUN, "--int4-only", "--work", str(work)]) == 0
    return work


def test_int4_only_prepare_exports_no_fp16_model(int4_only_work):
    work = int4_only_work
    state = gpu_setup.prepare_state(work)
    assert {k: s["state"] for k, s in state["steps"].items()} == {
        k: "done" for k in ("small-opt-fp32", "small-opt-fp16", "small-portable-fp32", "model-opt-int4")}
    assert not (work / "exports" / "model-opt").exists()
    manifest = json.loads((work / "exports" / "model-opt-int4" / "manifest.json").read_text())
    assert manifest["quantization"]["embedding"] is True and manifest["quantization"]["symmetric"] is True
    assert manifest["quantization"]["bits"] == 4 and manifest["quantization"]["block_size"] == 32
    data = (work / "exports" / "model-opt-int4" / "model.onnx.data").stat().st_size
    assert state["steps"]["model-opt-int4"]["bytes"] == data


def _int4_only_bench(work: Path, out: Path) -> tuple[int, dict]:
    rc = gpu.main(["--phase", "bench", *SMALL_RUN, "--int4-only", "--work", str(work), "--out", str(out)])
    doc = json.loads((out / "gpu-check.json").read_text())
    assert {p.name for p in out.iterdir()} == OUT_FILES
    assert doc["int4_only"] is True and doc["correctness"]["ok"] is True and not doc["errors"], doc["errors"]
    for r in doc["results"]:
        assert r["ttft_ms"] > 0 and r["tpot_ms"]["p90"] >= r["tpot_ms"]["p50"] > 0
        assert r["floor"]["tpot_floor_ms"] > 0 and r["floor"]["weight_bytes_per_step"] > 0
    int4 = [r for r in doc["results"] if r["engine"] == "ort-int4"]
    assert {(r["batch"], r["prompt_len"]) for r in int4} == {(1, 128), (1, 256), (2, 128)}
    assert all(r["dtype"] == "int4/float32" and r["export"].endswith("model-opt-int4") for r in int4)
    assert doc["model"]["export_bytes_estimate"] > 0
    return rc, doc


def test_int4_only_bench_times_the_int4_model_against_pytorch_where_it_fits(int4_only_work, tmp_path):
    rc, doc = _int4_only_bench(int4_only_work, tmp_path / "out")
    assert rc == 0 and doc["complete"] and doc["eager"]["run"] is True
    assert {r["engine"] for r in doc["results"]} == {"ort-int4", "torch-eager"}
    assert all(r["ratio"]["tpot_to_eager"] > 0 for r in doc["results"])
    eager = [r for r in doc["results"] if r["engine"] == "torch-eager"]
    assert all(r["export"] is None for r in eager)  # its floor: the config's fp32 weights, not the INT4 file
    assert [t["limit"] for t in doc["targets"]] == [2.0, 0.8, 1.0]
    assert all(t["value"] is not None and "note" not in t for t in doc["targets"])


def test_int4_only_bench_skips_pytorch_that_does_not_fit(int4_only_work, tmp_path, monkeypatch):
    """As 70B on an 80 GB H100: PyTorch's weights exceed the device, so it is skipped with the reason, the
    check is still complete, and the report shows the reason instead of ratios to PyTorch."""
    from llama3_deploy.benchmarks import gpu_bench
    monkeypatch.setattr(gpu_bench, "device_memory_bytes", lambda device: 1 << 20)
    out = tmp_path / "out"
    rc, doc = _int4_only_bench(int4_only_work, out)
    assert rc == 0 and doc["complete"] and doc["eager"]["run"] is False
    reason = doc["eager"]["reason"]
    assert reason.startswith("PyTorch eager fp32 needs") and "more than this host memory's" in reason
    assert {r["engine"] for r in doc["results"]} == {"ort-int4"}
    assert {"item": "PyTorch eager", "reason": reason} in doc["skipped"]
    assert all("tpot_to_eager" not in r["ratio"] for r in doc["results"])
    assert [t["limit"] for t in doc["targets"]] == [2.0, 0.8, 1.0]
    assert doc["targets"][0]["value"] is not None
    assert all(t["value"] is None and t["note"] == f"not run: {reason}" for t in doc["targets"][1:])
    md = (out / "gpu-check.md").read_text()
    assert f"Not run: {reason}. No ratios to PyTorch" in md and "PyTorch eager not run" in doc["title"]


def test_int4_only_prepare_skips_the_export_the_disk_cannot_hold(tmp_path, monkeypatch):
    """The free-disk check runs before the INT4 step: 70B's ~40 GB export does not start on 30 GB free."""
    monkeypatch.setattr(gpu, "_free_bytes", lambda path: 30 * 10**9)
    work = tmp_path / "work"
    assert gpu.main(["--phase", "prepare", "--int4-only", "--model", "random:meta-llama-3-70b-instruct",
                     "--steps", "model-opt-int4", "--work", str(work)]) == 0
    step = gpu_setup.prepare_state(work)["steps"]["model-opt-int4"]
    assert step["state"] == "skipped" and 35e9 < step["expected_bytes"] < 45e9
    assert step["reason"].startswith("30.0 GB free disk, ~") and "needed" in step["reason"]
    assert not (work / "exports" / "model-opt-int4").exists()


def test_parse_int4_only_and_the_70b_sizes(tmp_path):
    from llama3_deploy.benchmarks import gpu_sizes
    from llama3_deploy.config import preset
    args = gpu.parse(["--int4-only", "--model", "random:meta-llama-3-70b-instruct", "--quick"])
    assert args.int4_only and args.int4 and args.budget_s == 420.0
    assert not gpu.parse([]).int4_only
    with pytest.raises(SystemExit):
        gpu.parse(["--int4-only", "--no-int4"])
    steps = gpu._export_steps(args, tmp_path)
    assert "model-opt" not in steps and set(steps) == {"small-opt-fp32", "small-opt-fp16", "small-portable-fp32",
                                                       "model-opt-int4"}
    source, kw = steps["model-opt-int4"]
    assert source == "random:meta-llama-3-70b-instruct" and kw["quantization"] == gpu_sizes.int4_spec(embedding=True)
    assert "model-opt" in gpu._export_steps(gpu.parse([]), tmp_path)  # the default plan is unchanged
    c70 = preset("meta-llama-3-70b-instruct")
    int4 = gpu_sizes.export_bytes(c70, dtype="float16", quantization=kw["quantization"])
    assert 35e9 < int4 < 45e9 and gpu_sizes.weight_bytes(c70, dtype="float16") > 130e9


def test_export_size_estimate_matches_a_real_export(int4_only_work):
    """The estimate behind the disk check, against the INT4 export the prepare phase wrote (tiny, fp32)."""
    from llama3_deploy.benchmarks import gpu_sizes
    from llama3_deploy.benchmarks.gpu_checks import model_source, source_config
    config = source_config(model_source("tiny", int4_only_work))
    data = (int4_only_work / "exports" / "model-opt-int4" / "model.onnx.data").stat().st_size
    est = gpu_sizes.export_bytes(config, dtype="float32", quantization=gpu_sizes.int4_spec(embedding=True))
    assert abs(est - data) <= 0.02 * data


def test_pytorch_eager_runs_only_where_its_fp16_weights_fit():
    from llama3_deploy.benchmarks.gpu_sizes import eager_plan
    from llama3_deploy.config import preset
    h100 = 80 * 2**30
    big = eager_plan(preset("meta-llama-3-70b-instruct"), h100)
    assert big["run"] is False and big["weight_bytes"] > 130e9
    assert big["reason"].startswith("PyTorch eager fp16 needs 141 GB of weights, more than this GPU's 80 GiB")
    small = eager_plan(preset("meta-llama-3-8b-instruct"), h100)
    assert small["run"] is True and small["reason"] is None and 15e9 < small["weight_bytes"] < 17e9
    assert eager_plan(preset("meta-llama-3-8b-instruct"), 16 * 2**30)["run"] is False  # no room beside 16 GB


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
