"""`llama3-deploy calibrate` end to end on a tiny model: gated Q/DQ exports that TensorRT could build, that the
runtime runs, and that a bad calibration cannot produce."""
from __future__ import annotations

import json

import pytest

from llama3_deploy.calibration import stats as stats_module
from llama3_deploy.calibration.gate import GateThresholds
from llama3_deploy.calibration.pipeline import CalibrationPlan, calibrate_model
from llama3_deploy.cli import main
from llama3_deploy.errors import DeployError, ValidationError
from llama3_deploy.runtime import Generator

SMALL = dict(num_sequences=4, seq_len=48, decode_steps=4, heldout_sequences=4, heldout_len=48)


@pytest.fixture(scope="module")
def peaked_checkpoint(tmp_path_factory, demo):
    """The demo tokenizer with larger random weights (std 0.3): its next-token distributions are peaked, so a
    broken quantization shows in perplexity and KL (near-uniform std-0.02 logits hardly move either way)."""
    from llama3_deploy.export.pipeline import copy_tokenizer_files
    from llama3_deploy.export.weights import RandomWeights, write_checkpoint
    from .conftest import tiny_config
    info = demo[1]
    config = tiny_config(vocab_size=info["vocab_size"], bos_token_id=info["bos_token_id"],
                         eos_token_ids=tuple(info["eos_token_ids"]))
    ckpt = write_checkpoint(RandomWeights(config, seed=5, dtype="float32", std=0.3),
                            tmp_path_factory.mktemp("peaked") / "ckpt")
    copy_tokenizer_files(demo[0], ckpt)
    return ckpt


@pytest.fixture(scope="module")
def w8a8(peaked_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "w8a8"
    cache = out.parent / "stats.npz"
    return calibrate_model(str(peaked_checkpoint), out, plan=CalibrationPlan(**SMALL), cache=cache, progress=False)


def test_w8a8_export_is_gated_tensorrt_ready_and_runs(w8a8):
    m = w8a8.manifest
    q, v = m["qdq"], m["validation"]["qdq"]
    assert q["format"] == "int8" and q["smoothquant"]["alpha"] == 0.5 and q["clip"] == "mse"
    assert len(q["weights"]) == 2 * 7 + 1  # 7 projections per layer and the head
    assert v["tensorrt_ready"].startswith("passed") and v["accuracy_gate"]["passed"]
    assert v["accuracy_gate"]["kl_vs_fp32"] < 0.05 and m["validation"]["structure"]["onnx_checker"] == "passed"
    r = Generator(w8a8.output).generate([5, 9, 33], max_new_tokens=4, ignore_eos=True)
    assert len(r.generated_ids) == 4


def test_the_cache_is_reused_for_the_same_model_and_data(w8a8, peaked_checkpoint, tmp_path):
    again = calibrate_model(str(peaked_checkpoint), tmp_path / "again", plan=CalibrationPlan(**SMALL, gate=None),
                            cache=w8a8.output.parent / "stats.npz", progress=False)
    assert again.manifest["qdq"]["statistics"] == "cache"
    assert again.manifest["validation"]["qdq"]["accuracy_gate"].startswith("disabled")


def test_fp8_without_smoothquant(tok_checkpoint, tmp_path):
    r = calibrate_model(str(tok_checkpoint), tmp_path / "fp8",
                        plan=CalibrationPlan(fmt="fp8", smoothquant_alpha=None, **SMALL), progress=False)
    q = r.manifest["qdq"]
    assert q["format"] == "fp8" and q["opset"] >= 19 and q["smoothquant"] is None and q["clip"] == "amax"
    assert r.manifest["opset"] == q["opset"] and r.manifest["validation"]["qdq"]["accuracy_gate"]["passed"]


def test_a_bad_calibration_trips_the_gate_and_writes_nothing(peaked_checkpoint, tmp_path, monkeypatch):
    real = stats_module.ActivationStats.input_amax
    monkeypatch.setattr(stats_module.ActivationStats, "input_amax",
                        lambda self, *a, **k: {w: v / 100 for w, v in real(self, *a, **k).items()})  # far too small
    with pytest.raises(ValidationError, match="accuracy gate failed"):
        calibrate_model(str(peaked_checkpoint), tmp_path / "bad", plan=CalibrationPlan(**SMALL), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli(tok_checkpoint, tmp_path, capsys):
    assert main(["calibrate", "--model", str(tok_checkpoint), "--output", str(tmp_path / "cli"), "--num-sequences",
                 "4", "--seq-len", "48", "--decode-steps", "2", "--no-gate", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Q/DQ int8" in out and "TensorRT-ready: passed" in out
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["qdq"]["format"] == "int8"


def test_cli_kv_cache_int8_is_gated_and_runs(tok_checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "kv"
    assert main(["calibrate", "--model", str(tok_checkpoint), "--output", str(out_dir), "--kv-cache", "int8",
                 "--num-sequences", "4", "--seq-len", "48", "--decode-steps", "2", "--quiet"]) == 0
    assert "KV cache int8: 4 per-tensor scales" in capsys.readouterr().out
    m = json.loads((out_dir / "manifest.json").read_text())
    assert m["kv_dtype"] == "int8" and set(m["qdq"]["kv_cache"]["tensors"]) == {
        "layers.0.key", "layers.0.value", "layers.1.key", "layers.1.value"}
    assert m["validation"]["qdq"]["accuracy_gate"]["passed"]
    g = Generator(out_dir)
    assert g.session.kv_dtype == "int8" and len(g.generate([5, 9], max_new_tokens=3, ignore_eos=True).generated_ids) == 3


@pytest.mark.parametrize("argv,needle", [
    (["--format", "int4"], "invalid choice"),
    (["--format", "int4-awq", "--kv-cache", "int8"], "--kv-cache"),
    (["--kv-cache", "int4"], "invalid choice"),
    (["--smoothquant-alpha", "2"], "--smoothquant-alpha"),
    (["--seq-len", "100000"], "seq_len"),  # the last --seq-len wins
    (["--max-kl", "-1"], "max_kl"),
    (["--data", "/nonexistent.jsonl"], "nonexistent"),
])
def test_cli_refuses_bad_options(tok_checkpoint, tmp_path, capsys, argv, needle):
    try:
        rc = main(["calibrate", "--model", str(tok_checkpoint), "--output", str(tmp_path / "x"), "--quiet",
                   "--seq-len", "48", *argv])
    except SystemExit as e:  # argparse's own refusal of a choice
        rc = e.code
    assert rc == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_random_weights_need_a_tokenizer(tmp_path):
    with pytest.raises(DeployError, match="--tokenizer"):
        calibrate_model("random:llama3-cpu-bench", tmp_path / "x", plan=CalibrationPlan(**SMALL), progress=False)


def test_plan_refuses_unknown_values():
    with pytest.raises(DeployError, match="format"):
        CalibrationPlan(fmt="int4")
    with pytest.raises(DeployError, match="clip"):
        CalibrationPlan(clip="p99")
    with pytest.raises(DeployError, match="KV cache format"):
        CalibrationPlan(kv_cache="int4")
    with pytest.raises(DeployError, match="max_ppl_increase"):
        GateThresholds(max_ppl_increase=float("nan"))


def test_calibration_quality_report_on_a_tiny_trained_model(tmp_path, monkeypatch):
    from llama3_deploy.benchmarks import calibration_quality
    from llama3_deploy.calibration.train_small import train
    from tests.test_train_small import TINY
    ckpt = tmp_path / "ckpt"
    train(ckpt, seed=0, log=lambda m: None, **TINY)
    monkeypatch.setattr(calibration_quality, "VARIANTS", {"w8a8-int8-smoothquant": {"fmt": "int8",
                                                                                    "smoothquant_alpha": 0.5}})
    out = tmp_path / "results" / "cal"
    record = calibration_quality.run(str(ckpt), str(out), windows=2, window_length=TINY["eval_length"],
                                     num_sequences=4, seq_len=TINY["eval_length"], workdir=str(tmp_path / "w"),
                                     command="test")
    rows = {r["variant"]: r for r in record["variants"]}
    assert rows["fp32 (portable)"]["kl_vs_fp32"] < 1e-6 and abs(rows["fp32 (portable)"]["ppl_change"]) < 1e-6
    assert rows["w8a8-int8-smoothquant"]["onnx_bytes"] < rows["fp32 (portable)"]["onnx_bytes"]  # embedding stays fp32
    assert "| w8a8-int8-smoothquant |" in (tmp_path / "results" / "cal.md").read_text()


def test_a_gate_that_cannot_fit_is_refused_before_any_work(tmp_path, demo, monkeypatch):
    """random 8B weights: the gate's fp32 graph (30 GiB) cannot run beside the quantized one in 24 GiB."""
    import os
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (24 << 30) // 4096}[name])
    with pytest.raises(DeployError, match="--no-gate"):
        calibrate_model("random:meta-llama-3-8b-instruct", tmp_path / "x", plan=CalibrationPlan(**SMALL),
                        tokenizer=demo[0], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_int4_awq_is_gated(peaked_checkpoint, tmp_path, capsys):
    assert main(["calibrate", "--model", str(peaked_checkpoint), "--output", str(tmp_path / "awq"), "--format",
                 "int4-awq", "--block-size", "16", "--num-sequences", "4", "--seq-len", "48", "--decode-steps", "2",
                 "--max-ppl-increase", "1", "--max-kl", "5", "--quiet"]) == 0
    m = json.loads((tmp_path / "awq" / "manifest.json").read_text())
    assert m["flavor"] == "optimized" and m["quantization"]["bits"] == 4 and m["awq"]["method"] == "awq"
    assert m["awq"]["accuracy_gate"]["passed"] and m["validation"]["numeric"]["steps"]
    assert "AWQ: alpha per layer group" in capsys.readouterr().out
    r = Generator(tmp_path / "awq").generate([5, 9, 33], max_new_tokens=3, ignore_eos=True)
    assert len(r.generated_ids) == 3
