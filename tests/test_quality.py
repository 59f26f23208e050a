"""benchmarks.quality on a tiny trained model: every variant exported and measured, report written, fp32 consistent."""
from __future__ import annotations

import inspect
import json
import math

import pytest

from tests.test_train_small import TINY


def _api_missing() -> str | None:
    """Why the quantized export / prompt-scoring API is unavailable, or None when it is there."""
    try:
        from llama3_deploy.export.pipeline import export_model
        from llama3_deploy.export.quantize import QuantSpec  # noqa: F401
        from llama3_deploy.runtime.generate import Generator
    except ImportError as e:
        return f"quantized export API not available yet ({e})"
    if not {"flavor", "logits", "quantization"} <= set(inspect.signature(export_model).parameters):
        return "export_model has no flavor/logits/quantization arguments yet"
    if not hasattr(Generator, "prompt_logits"):
        return "runtime.generate.Generator has no prompt_logits yet"
    return None


pytestmark = pytest.mark.skipif(_api_missing() is not None, reason=str(_api_missing()))


def test_greedy_agreement_definitions():
    from llama3_deploy.benchmarks.quality import greedy_agreement
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    got = greedy_agreement(ref, [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert got == {"greedy_prefix": (0.5 + 1.0) / 2, "greedy_overall": (0.75 + 1.0) / 2, "greedy_identical": 1}
    assert greedy_agreement(ref, [[9, 2, 3, 4], [5, 6, 7]])["greedy_prefix"] == (0.0 + 0.75) / 2


def test_quality_report_on_tiny_trained_model(tmp_path):
    from llama3_deploy.benchmarks.quality import run_quality
    from llama3_deploy.calibration.train_small import train
    ckpt = tmp_path / "ckpt"
    training = train(ckpt, seed=0, log=lambda m: None, **TINY)
    out = tmp_path / "results" / "quality-tiny"
    record = run_quality(ckpt, out, block_size=16, windows=TINY["eval_windows"], window_length=TINY["eval_length"],
                         prompts=2, prompt_length=8, new_tokens=8, workdir=tmp_path / "work", command="test",
                         log=lambda m: None)
    assert json.loads(out.with_name("quality-tiny.json").read_text()) == record
    rows = {r["variant"]: r for r in record["variants"]}
    assert list(rows) == ["fp32", "int8-rtn-sym-b16", "int8-rtn-asym-b16", "int4-rtn-sym-b16",
                          "int4-rtn-asym-b16", "int4-hqq-asym-b16", "int4-awq-sym-b16"]
    md = out.with_name("quality-tiny.md").read_text()
    assert all(f"| {name} |" in md for name in rows)
    assert record["model"]["trained_small_model"] and record["model"]["training"] == training
    assert record["command"] == "test" and {"onnxruntime", "torch"} <= set(record["versions"])

    fp32 = rows["fp32"]
    assert (fp32["ppl_change"], fp32["kl_vs_fp32"], fp32["greedy_prefix"], fp32["greedy_overall"]) == (0, 0, 1, 1)
    # the fp32 export scores the same held-out windows as the training run's PyTorch evaluation
    assert math.isclose(fp32["perplexity"], training["heldout"]["perplexity"], rel_tol=1e-3)
    for name, r in rows.items():
        assert r["scored_tokens"] == TINY["eval_windows"] * (TINY["eval_length"] - 1)
        assert 0 <= r["greedy_prefix"] <= r["greedy_overall"] <= 1 and 0 <= r["top1_vs_fp32"] <= 1
        assert name == "fp32" or r["kl_vs_fp32"] > 0
    assert rows["int8-rtn-sym-b16"]["kl_vs_fp32"] < rows["int4-rtn-sym-b16"]["kl_vs_fp32"]
    assert abs(rows["int8-rtn-asym-b16"]["ppl_change"]) < 0.05
    assert rows["int4-rtn-asym-b16"]["onnx_bytes"] < rows["int8-rtn-asym-b16"]["onnx_bytes"] < fp32["onnx_bytes"]
    assert not list((tmp_path / "work").iterdir())  # temporary exports removed
