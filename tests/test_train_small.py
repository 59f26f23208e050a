"""calibration.train_small: a tiny training run writes a checkpoint the exporter accepts; held-out data is stable."""
from __future__ import annotations

import json

import pytest

from llama3_deploy.calibration import train_small

TINY = dict(steps=30, batch_size=4, seq_len=64, lr=5e-3, hidden_size=64, intermediate_size=128, num_layers=1,
            num_heads=4, num_kv_heads=2, head_dim=16, base_vocab=400, max_corpus_chars=200_000,
            tokenizer_chars=300_000, eval_windows=4, eval_length=64, log_every=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ckpt"
    record = train_small.train(out, seed=0, command="test", log=lambda m: None, **TINY)
    return out, record


def test_checkpoint_loads_with_project_readers(trained):
    from llama3_deploy.export.weights import SafetensorsCheckpoint, name_table
    from llama3_deploy.config import load_config
    out, record = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json", "training.json"]
    cfg = load_config(out)
    assert cfg.vocab_size == record["tokenizer"]["vocab_size"] == record["tokenizer"]["base_vocab_size"] + 256
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 1)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings
    assert cfg.rope_scaling is None and cfg.source_dtype == "float32"
    assert cfg.bos_token_id == record["tokenizer"]["bos_token_id"]
    assert list(cfg.eos_token_ids) == record["tokenizer"]["eos_token_ids"]  # <|end_of_text|>, <|eot_id|>
    ckpt = SafetensorsCheckpoint(out)  # strict: every name in the table, nothing else, right shapes
    assert set(ckpt.location) == {e.source for e in name_table(cfg)}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == record["tokenizer"]["eos_token_ids"]


def test_training_record_and_loss_decrease(trained):
    out, record = trained
    assert json.loads((out / "training.json").read_text()) == record
    assert record["tokens_seen"] == 30 * 4 * 64 and record["seed"] == 0 and record["command"] == "test"
    assert record["final_train_loss"] < record["first_train_loss"] - 1.0
    assert 1.0 < record["heldout"]["perplexity"] < record["tokenizer"]["vocab_size"]
    assert {"torch", "transformers", "tokenizers", "python"} <= set(record["versions"])


def test_heldout_windows_deterministic_and_disjoint(trained):
    out, record = trained
    first = train_small.heldout_token_windows(out, count=4, length=64, seed=0)
    assert first == train_small.heldout_token_windows(out, count=4, length=64, seed=0)
    assert first != train_small.heldout_token_windows(out, count=4, length=64, seed=1)
    assert [len(w) for w in first] == [64] * 4
    # the training run's held-out figure is over exactly these windows
    import math

    from transformers import LlamaForCausalLM
    nll, _ = train_small.heldout_nll(LlamaForCausalLM.from_pretrained(out), first)
    assert math.isclose(nll, record["heldout"]["loss"], rel_tol=1e-4)

    root = train_small.stdlib_root()
    train_files, heldout_files = train_small.corpus_split()
    assert train_files and heldout_files and not set(train_files) & set(heldout_files)
    assert all(train_small.is_heldout(p.relative_to(root).as_posix()) for p in heldout_files)
    assert not any(train_small.is_heldout(p.relative_to(root).as_posix()) for p in train_files)
    assert record["corpus"]["heldout_files_total"] == len(heldout_files)


def test_refuses_non_empty_output(tmp_path, capsys):
    from llama3_deploy.errors import DeployError
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DeployError, match="not empty"):
        train_small.train(out, **TINY)
    assert train_small.main(["--output", str(out), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
