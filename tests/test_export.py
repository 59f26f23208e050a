"""The exported ONNX decoder against transformers, Optimum interop, the real configs, and bad input."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from llama3_deploy import contract
from llama3_deploy.export import onnx_export, validate
from llama3_deploy.export.pipeline import export_model
from llama3_deploy.export.spec import ExportSpec
from llama3_deploy.cli import main
from llama3_deploy.config import load_config
from llama3_deploy.errors import DeployError, ValidationError
from tests.conftest import PARITY_CONFIGS, tiny_config, write_random_checkpoint
from tests.test_model import ATOL, hf_kv, hf_model, left_padded


def session(export_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(export_dir / contract.MODEL_FILE), providers=["CPUExecutionProvider"])


def run_onnx(sess, config, ids, mask, pos, past=None):
    io = contract.decoder_io(config, "float32")
    if past is None:
        past = [np.zeros((ids.shape[0], config.num_key_value_heads, 0, config.head_dim), np.float32)
                for _ in io.past_names]
    feed = {contract.INPUT_IDS: np.asarray(ids), contract.ATTENTION_MASK: np.asarray(mask),
            contract.POSITION_IDS: np.asarray(pos), **dict(zip(io.past_names, past))}
    logits, *present = sess.run(None, feed)
    return logits, present


@pytest.mark.parametrize("name", ["gqa1_mha", "gqa8_hd64", "rope_llama3"])
def test_onnx_matches_transformers(name, tmp_path):
    config = PARITY_CONFIGS[name]
    ckpt = write_random_checkpoint(tmp_path / "ckpt", config, seed=5)
    out = export_model(str(ckpt), tmp_path / "onnx", progress=False).output
    ref, sess = hf_model(ckpt), session(out)
    ids, mask, pos = left_padded(config)
    if config.rope_scaling is not None:
        pos = pos + 200  # beyond original_max_position_embeddings
    with torch.no_grad():
        hf = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits, present = run_onnx(sess, config, ids, mask, pos)
    valid = mask.bool().numpy()
    assert np.abs(hf.logits.numpy() - logits)[valid].max() <= ATOL
    for a, b in zip(hf_kv(hf.past_key_values), present):
        assert np.abs(a.numpy() - b).max() <= ATOL
    nxt, mask2, pos2 = torch.tensor([[3], [4], [5]]), torch.cat([mask, torch.ones(3, 1, dtype=torch.int64)], 1), pos[:, -1:] + 1
    with torch.no_grad():
        hf2 = ref(input_ids=nxt, attention_mask=mask2, position_ids=pos2, past_key_values=hf.past_key_values)
    logits2, present2 = run_onnx(sess, config, nxt, mask2, pos2, present)
    assert np.abs(hf2.logits.numpy() - logits2).max() <= ATOL
    for a, b in zip(hf_kv(hf2.past_key_values), present2):
        assert np.abs(a.numpy() - b).max() <= ATOL


def test_export_directory_and_manifest(tiny_export, tiny_checkpoint):
    names = {p.name for p in tiny_export.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "generation_config.json", "manifest.json"} <= names
    assert not [n for n in names if n.startswith(".")]
    m = json.loads((tiny_export / "manifest.json").read_text())
    config = load_config(tiny_checkpoint)
    assert m["io"] == contract.decoder_io(config, "float32").to_json()
    assert m["dtype"] == "float32" and m["flavor"] == "portable" and m["opset"] == onnx_export.OPSET
    assert {"torch", "onnx", "onnxruntime"} <= set(m["tools"])
    steps = m["validation"]["numeric"]["steps"]
    assert [s["step"] for s in steps] == ["prefill", "decode"] and all(s["ok"] for s in steps)
    assert m["validation"]["structure"]["external_data_files"] == ["model.onnx.data"]
    assert load_config(tiny_export).eos_token_ids == (1, 2, 3)


def test_graph_io_follows_contract(tiny_export):
    config = load_config(tiny_export)
    io = contract.decoder_io(config, "float32")
    sess = session(tiny_export)
    assert [(i.name, tuple(i.shape)) for i in sess.get_inputs()] == [(s.name, s.shape) for s in io.inputs]
    assert [(o.name, tuple(o.shape)) for o in sess.get_outputs()] == [(s.name, s.shape) for s in io.outputs]


def test_onnx_prefill_equals_steps_and_padding(tiny_export):
    config = load_config(tiny_export)
    sess = session(tiny_export)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 8))
    full, full_present = run_onnx(sess, config, ids, np.ones((1, 8), np.int64), np.arange(8)[None])
    past = None
    for t in range(8):
        step, past = run_onnx(sess, config, ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]), past)
        assert np.abs(step[0, 0] - full[0, t]).max() <= ATOL
    for a, b in zip(past, full_present):
        assert np.abs(a - b).max() <= ATOL
    tids, tmask, tpos = (t.numpy() for t in left_padded(config))
    batch, _ = run_onnx(sess, config, tids, tmask, tpos)
    for row in range(3):
        keep = tmask[row].astype(bool)
        alone, _ = run_onnx(sess, config, tids[row:row + 1, keep], np.ones((1, keep.sum()), np.int64),
                            tpos[row:row + 1, keep])
        assert np.abs(alone[0] - batch[row, keep]).max() <= ATOL


def test_optimum_generates_same_greedy_tokens(tiny_export, tiny_checkpoint):
    from optimum.onnxruntime import ORTModelForCausalLM
    ours = ORTModelForCausalLM.from_pretrained(tiny_export, use_cache=True, use_io_binding=False)
    ref = hf_model(tiny_checkpoint)
    ids = torch.tensor([[5, 9, 33, 100, 7], [0, 0, 44, 21, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(**kw), ref.generate(**kw))


def test_fp16_export_validates(tiny_checkpoint, tmp_path):
    result = export_model(str(tiny_checkpoint), tmp_path / "fp16", dtype="fp16", progress=False)
    numeric = result.manifest["validation"]["numeric"]
    assert numeric["dtype"] == "float16" and all(s["ok"] for s in numeric["steps"])
    sess = session(result.output)
    assert sess.get_inputs()[3].type == "tensor(float16)" and sess.get_outputs()[0].type == "tensor(float)"


def test_reduced_depth_validation(tiny_checkpoint, tmp_path):
    result = export_model(str(tiny_checkpoint), tmp_path / "reduced", progress=False, validate_max_bytes=1)
    numeric = result.manifest["validation"]["numeric"]
    assert numeric["reduced"] and numeric["layers_validated"] == 2 and numeric["vocab_rows_validated"] == 512
    assert result.manifest["validation"]["structure"]["onnx_checker"] == "passed"
    assert not (result.output / ".validate-reduced").exists()


def test_drift_fails_the_export_and_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(validate.TOLERANCES, "float16", validate.Tolerance(atol=0.0, rtol=0.0))
    with pytest.raises(ValidationError, match="drifts from PyTorch"):
        export_model(str(tiny_checkpoint), tmp_path / "drift", dtype="float16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_random_source_needs_no_files(tmp_path):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(tiny_config(num_hidden_layers=1).to_hf_dict()))
    result = export_model(f"random:{cfg_dir}", tmp_path / "out", progress=False, seed=3)
    assert result.manifest["source"]["kind"] == "random" and result.manifest["source"]["seed"] == 3


@pytest.mark.parametrize("model", ["meta-llama-3-8b-instruct", "meta-llama-3.1-8b-instruct", "meta-llama-3-70b-instruct"])
def test_real_configs_parse_and_trace(shared_dir, model):
    from llama3_deploy.config import preset
    config = load_config(shared_dir / "configs" / model)
    assert config == preset(model)  # the built-in presets are the real architectures
    if model.startswith("meta-llama-3.1"):
        assert config.rope_scaling is not None and config.eos_token_ids == (128001, 128008, 128009)
    # real widths, meta weights: no memory
    graph = onnx_export.trace(ExportSpec.make(config.with_layers(1), dtype="float16", flavor="portable"))
    assert [v.name for v in graph.graph.inputs] == [s.name for s in contract.decoder_io(config.with_layers(1), "float16").inputs]
    shapes = {n: tuple(v.shape) for n, v in graph.graph.initializers.items()}
    assert shapes["embed"] == (128256, config.hidden_size)
    assert shapes["layers.0.attn.wk"] == (config.hidden_size, config.num_key_value_heads * 128)


# --- bad input: a clear message, exit code 2, and nothing left behind ----------------------------------
def _export_cli(model, out, *extra, capsys):
    rc = main(["export", "--model", str(model), "--output", str(out), "--quiet", *extra])
    return rc, capsys.readouterr().err


def _rewrite_tensor(ckpt: Path, name: str, value) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(ckpt / "model.safetensors")
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, ckpt / "model.safetensors")


BAD_INPUTS = {
    "missing_dir": (lambda d: d / "nope", "model not found"),
    "missing_config": (lambda d: (d / "config.json").unlink() or d, "config.json not found"),
    "malformed_config": (lambda d: (d / "config.json").write_text("{not json") and d, "not valid JSON"),
    "unsupported_model_type": (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "model_type": "mistral"})) and d, "unsupported model_type 'mistral'"),
    "unsupported_rope": (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "rope_scaling": {"type": "linear", "factor": 2.0}})) and d,
        "rope_scaling type 'linear'"),
    "wrong_shape": (lambda d: _rewrite_tensor(d, "model.norm.weight", torch.ones(65)) or d,
                    "model.norm.weight: checkpoint (65,), config expects (64,)"),
    "missing_weight": (lambda d: _rewrite_tensor(d, "model.layers.1.mlp.up_proj.weight", None) or d,
                       "missing tensor(s): model.layers.1.mlp.up_proj.weight"),
    "extra_weight": (lambda d: _rewrite_tensor(d, "model.layers.9.mlp.up_proj.weight", torch.ones(2)) or d,
                     "unexpected tensor(s): model.layers.9.mlp.up_proj.weight"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]) and d,
                  "truncated or corrupt"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_checkpoint(case, tmp_path, capsys):
    make, message = BAD_INPUTS[case]
    ckpt = write_random_checkpoint(tmp_path / "ckpt", tiny_config(), seed=2)
    model = make(ckpt)
    rc, err = _export_cli(model, tmp_path / "out", capsys=capsys)
    assert rc == 2 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


class _Bomb:
    """Unpickling this would create a marker file: proves pickle checkpoints are never loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_only_checkpoint_is_refused_unopened(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    marker = tmp_path / "unpickled"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(marker)))
    rc, err = _export_cli(ckpt, tmp_path / "out", capsys=capsys)
    assert rc == 2 and "pickle checkpoints" in err and "pytorch_model.bin" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_dtype(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(DeployError, match="unsupported dtype 'int3'"):
        export_model(str(tiny_checkpoint), tmp_path / "x", dtype="int3")
    assert list(tmp_path.iterdir()) == []


def test_output_is_a_file(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    target.write_text("keep me")
    rc, err = _export_cli(tiny_checkpoint, target, capsys=capsys)
    assert rc == 2 and "is a file" in err and target.read_text() == "keep me"


def test_existing_output_survives_a_failed_export(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    rc, err = _export_cli(tmp_path / "missing", out, "--overwrite", capsys=capsys)
    assert rc == 2 and (out / "precious.txt").read_text() == "keep"
    rc, err = _export_cli(tmp_path / "missing", out, capsys=capsys)
    assert rc == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bf16_export_is_checked_structurally_and_says_why(tiny_checkpoint, tmp_path):
    result = export_model(str(tiny_checkpoint), tmp_path / "bf16", dtype="bf16", progress=False)
    validation = result.manifest["validation"]
    assert validation["structure"]["onnx_checker"] == "passed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CUDA execution provider" in validation["numeric"]
    import onnx
    proto = onnx.load(str(result.output / "model.onnx"), load_external_data=False)
    assert proto.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16


def test_sharded_checkpoint_loads_strictly(tmp_path):
    from llama3_deploy.export.weights import RandomWeights, SafetensorsCheckpoint, write_checkpoint
    from llama3_deploy.errors import CheckpointError
    config = tiny_config()
    source = RandomWeights(config, seed=9, dtype="float32")
    ckpt = write_checkpoint(source, tmp_path / "sharded", shard_bytes=200_000)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = SafetensorsCheckpoint(ckpt)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(loaded.get(name), source.get(name))
    assert torch.equal(loaded.get_rows("lm_head.weight", 10, 20), source.get("lm_head.weight")[10:20])
    first_shard = ckpt / sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "elsewhere.safetensors").write_bytes(first_shard.read_bytes())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        SafetensorsCheckpoint(ckpt)
