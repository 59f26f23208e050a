"""benchmarks/long_context.py: generation past the original context, and the cache sized by the request."""
from __future__ import annotations

import json

import pytest

from llama3_deploy.benchmarks import long_context
from tests.conftest import PARITY_CONFIGS, write_random_checkpoint


@pytest.fixture(scope="module")
def rope_export(tmp_path_factory):
    from llama3_deploy.export.pipeline import export_model
    root = tmp_path_factory.mktemp("rope")
    ckpt = write_random_checkpoint(root / "ckpt", PARITY_CONFIGS["rope_llama3"], seed=5)
    return export_model(str(ckpt), root / "onnx", flavor="optimized", argmax=True, progress=False).output


def test_past_the_original_context_with_a_cache_of_one_page(rope_export, tmp_path, capsys):
    result = tmp_path / "r.json"
    assert long_context.main(["--model", str(rope_export), "--prompt-tokens", "40", "--new-tokens", "5",
                              "--result", str(result)]) == 0
    r = json.loads(result.read_text())
    assert (r["first_generated_position"], r["last_generated_position"]) == (40, 44)  # past 32 original positions
    assert r["config"]["rope_scaling"]["original_max_position_embeddings"] == 32 and len(r["generated_ids"]) == 5
    per_token = r["kv_cache"]["kv_bytes_per_token"]
    assert r["kv_cache"]["capacity_tokens"] == 256 and r["kv_cache"]["kv_bytes"] == 256 * per_token
    assert r["whole_context_bytes"] > 1024 * per_token and r["whole_context"].startswith("allocatable")
    assert "seeded random" in r["weights"] and r["command"].endswith("--result " + str(result))
    assert "KV cache: 1 row x 256 positions" in capsys.readouterr().out


def test_the_whole_context_is_refused_before_allocating_on_a_small_machine(rope_export, monkeypatch):
    from llama3_deploy.runtime import kv
    real = kv._physical_memory()
    # room for the request's page, not for the model's 1,024 positions (plus logits and masks)
    monkeypatch.setattr(kv, "_physical_memory", lambda: 300_000)  # the page needs ~160 KB, the whole ~560 KB
    r = long_context.run(model=str(rope_export), prompt_tokens=40, new_tokens=2)
    assert r["whole_context"].startswith("refused: a KV cache for 1 row(s) of 1024 tokens")
    assert "more than this machine's" in r["whole_context"] and real


def test_bad_model_is_one_clear_error(tmp_path, capsys):
    assert long_context.main(["--model", str(tmp_path / "nope"), "--prompt-tokens", "4"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
