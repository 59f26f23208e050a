"""Shared fixtures: tiny random Llama configs, checkpoints written in the test, cached exports."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from llama3_deploy.config import LlamaConfig, RopeScaling

SHARED_ENV = "LLAMA3_SHARED_DIR"


def tiny_config(**overrides) -> LlamaConfig:
    """A small Llama 3-shaped config: GQA 2:1, head_dim 16, rope theta 500000, three EOS ids."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=500000.0,
                bos_token_id=0, eos_token_ids=(1, 2, 3), source_dtype="float32")
    base.update(overrides)
    return LlamaConfig(**base)


# Named configs the parity tests run over (GQA 1:1 and 8:1, head_dim 64, Llama 3.1 rope scaling).
PARITY_CONFIGS = {
    "gqa2_hd16": tiny_config(),
    "gqa1_mha": tiny_config(num_attention_heads=4, num_key_value_heads=4),
    "gqa8_hd64": tiny_config(hidden_size=128, num_attention_heads=8, num_key_value_heads=1, head_dim=64),
    "rope_llama3": tiny_config(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), max_position_embeddings=1024),
    "tied": tiny_config(tie_word_embeddings=True),
}


def write_random_checkpoint(path: Path, config: LlamaConfig, *, seed: int = 0, dtype: str = "float32") -> Path:
    from llama3_deploy.export.weights import RandomWeights, write_checkpoint
    config = dataclasses.replace(config, source_dtype=dtype)
    return write_checkpoint(RandomWeights(config, seed=seed, dtype=dtype), path)


def _shared(config, key, factory):
    """Build an expensive object once per session, across test modules (cached on pytest's config)."""
    store = config.__dict__.setdefault("_llama3_deploy_cache", {})
    if key not in store:
        store[key] = factory()
    return store[key]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    value = os.environ.get(SHARED_ENV)
    if not value:
        pytest.skip(f"{SHARED_ENV} is not set (it points at the real Llama 3 tokenizer and configs; .ci/run sets it)")
    path = Path(value).resolve()  # relative values are the README's (../shared/llama3); fixtures link to it from tmp
    if not (path / "tokenizer" / "tokenizer.json").is_file() or not (path / "tokenizer" / "tokenizer.model").is_file():
        pytest.skip(f"{SHARED_ENV}={value} lacks tokenizer/tokenizer.json and tokenizer/tokenizer.model")
    return path


@pytest.fixture(scope="session")
def vectors(shared_dir):
    import json
    return json.loads((shared_dir / "test-vectors.json").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The default tiny config as a safetensors checkpoint (fp32, so comparisons are exact)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config(), seed=1)


def _export(checkpoint: Path, tmp_path_factory) -> Path:
    """A checkpoint exported to fp32 ONNX, validated."""
    from llama3_deploy.export.pipeline import export_model
    return export_model(str(checkpoint), tmp_path_factory.mktemp("export") / "onnx", progress=False).output


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    return _export(tiny_checkpoint, tmp_path_factory)


@pytest.fixture(scope="session")
def tok_checkpoint(tmp_path_factory) -> Path:
    """A tiny model carrying the project's own demo tokenizer (Llama 3 special-token layout, chat template)."""
    from llama3_deploy.calibration.demo_tokenizer import build_demo_tokenizer
    from llama3_deploy.export.pipeline import copy_tokenizer_files
    root = tmp_path_factory.mktemp("tok")
    tok = build_demo_tokenizer(root / "tokenizer", vocab_size=1000)
    config = tiny_config(vocab_size=tok["vocab_size"], bos_token_id=tok["bos_token_id"],
                         eos_token_ids=tuple(tok["eos_token_ids"]))
    ckpt = write_random_checkpoint(root / "ckpt", config, seed=11)
    copy_tokenizer_files(root / "tokenizer", ckpt)
    return ckpt


@pytest.fixture(scope="session")
def tok_export(tok_checkpoint, tmp_path_factory) -> Path:
    return _export(tok_checkpoint, tmp_path_factory)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The project's demo tokenizer, built once: (directory, build_demo_tokenizer's summary)."""
    from llama3_deploy.calibration.demo_tokenizer import build_demo_tokenizer
    out = tmp_path_factory.mktemp("demo") / "tokenizer"
    return out, build_demo_tokenizer(out)


@pytest.fixture(scope="session")
def served_export(tok_checkpoint, tmp_path_factory) -> Path:
    """The demo-tokenizer model as the optimized flavor with in-graph argmax: what `serve` and the engine run."""
    from llama3_deploy.export.pipeline import export_model
    return export_model(str(tok_checkpoint), tmp_path_factory.mktemp("served") / "onnx", flavor="optimized",
                        argmax=True, progress=False).output
