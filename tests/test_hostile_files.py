"""Hostile inputs: symlinks out of the checkpoint, outputs that would destroy data, absurd or mistyped configs,
stray and non-finite weights. Each is refused with a DeployError naming the problem, leaving nothing behind."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3_deploy import fsutil
from llama3_deploy.cli import main
from llama3_deploy.config import MAX_LAYERS, LlamaConfig, load_config, read_json
from llama3_deploy.errors import CheckpointError, DeployError
from llama3_deploy.export import weights
from llama3_deploy.export.weights import SafetensorsCheckpoint, open_source, target_tensor, write_checkpoint
from tests.conftest import tiny_config, write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt_template(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tpl") / "ckpt", tiny_config(), seed=4)


@pytest.fixture
def ckpt(ckpt_template, tmp_path) -> Path:
    """A fresh copy of a tiny fp32 checkpoint, so each test may damage its own."""
    return Path(shutil.copytree(ckpt_template, tmp_path / "ckpt"))


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def edit_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def hub_snapshot(root: Path, ckpt: Path) -> Path:
    """The Hugging Face cache layout: models--ORG--NAME/{blobs/<sha256>, snapshots/<rev>/<file> -> ../../blobs/}."""
    repo = root / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for f in sorted(ckpt.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    return snap


# --- 1. containment ------------------------------------------------------------------------------------------
def test_side_files_linked_outside_the_checkpoint_are_refused(ckpt, tmp_path):
    (ckpt / "tokenizer.model").symlink_to("/etc/passwd")
    source = SafetensorsCheckpoint(ckpt)
    with pytest.raises(CheckpointError, match="tokenizer.model .*outside the checkpoint directory"):
        source.side_file("tokenizer.model")
    assert source.side_file("tokenizer.json") is None
    assert source.side_file("config.json") == (ckpt / "config.json").resolve()


def test_config_linked_outside_is_refused_everywhere(ckpt, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere.json"
    shutil.move(ckpt / "config.json", elsewhere)
    (ckpt / "config.json").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="config.json .*outside the checkpoint directory"):
        load_config(ckpt)
    rc = main(["export", "--model", str(ckpt), "--output", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and "outside the checkpoint directory" in capsys.readouterr().err
    assert listing(tmp_path) == ["ckpt", "elsewhere.json"]


def test_links_inside_the_checkpoint_are_fine(ckpt):
    (ckpt / "real").mkdir()
    shutil.move(ckpt / "config.json", ckpt / "real" / "config.json")
    (ckpt / "config.json").symlink_to("real/config.json")
    shutil.move(ckpt / "model.safetensors", ckpt / "real" / "weights.bin")
    (ckpt / "model.safetensors").symlink_to(ckpt / "real" / "weights.bin")
    assert SafetensorsCheckpoint(ckpt).config == tiny_config()


@pytest.mark.parametrize("case", ["weights_outside", "dangling", "config_is_dir", "index_outside"])
def test_bad_checkpoint_links(case, ckpt, tmp_path):
    if case == "weights_outside":
        shutil.move(ckpt / "model.safetensors", tmp_path / "w.safetensors")
        (ckpt / "model.safetensors").symlink_to(tmp_path / "w.safetensors")
        message = "model.safetensors .*outside the checkpoint"
    elif case == "dangling":
        (ckpt / "generation_config.json").unlink()
        (ckpt / "generation_config.json").symlink_to(tmp_path / "nowhere")
        message = "generation_config.json is a dangling symlink"
    elif case == "config_is_dir":
        (ckpt / "config.json").unlink()
        (ckpt / "config.json").mkdir()
        message = "config.json is not a regular file"
    else:
        (tmp_path / "index.json").write_text(json.dumps({"weight_map": {}}))
        (ckpt / weights.INDEX_FILE).symlink_to(tmp_path / "index.json")
        message = "index.json .*outside the checkpoint"
    with pytest.raises(CheckpointError, match=message):
        SafetensorsCheckpoint(ckpt)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hub_cache_snapshot_loads(sharded, tmp_path):
    src = tmp_path / "src"
    if sharded:
        write_checkpoint(weights.RandomWeights(tiny_config(), seed=3, dtype="float32"), src, shard_bytes=200_000)
        assert (src / weights.INDEX_FILE).exists()
    else:
        write_random_checkpoint(src, tiny_config(), seed=3)
    snap = hub_snapshot(tmp_path / "hub", src)
    assert fsutil.containment_root(snap) == (tmp_path / "hub" / "models--org--tiny").resolve()
    loaded = SafetensorsCheckpoint(snap)
    assert loaded.config == tiny_config()
    assert torch.equal(loaded.get("lm_head.weight"), weights.RandomWeights(tiny_config(), seed=3,
                                                                           dtype="float32").get("lm_head.weight"))
    assert loaded.side_file("generation_config.json").parent.name == "blobs"
    # a link escaping the repository folder is still refused
    (snap / "tokenizer.model").symlink_to("../../../../src/config.json")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        loaded.side_file("tokenizer.model")
    # and the repository folder is protected as an output, as the snapshot itself is
    with pytest.raises(DeployError, match="contains the input"):
        fsutil.check_output_dir(tmp_path / "hub" / "models--org--tiny", overwrite=True, protect=[snap])


INDEX_CASES = {
    "directory": (lambda p: p.mkdir(), "is not a regular file"),
    "not_utf8": (lambda p: p.write_bytes(b'{"weight_map": "\xff\xfe"}'), "not valid UTF-8"),
    "map_is_list": (lambda p: p.write_text('{"weight_map": ["model.safetensors"]}'), "weight_map must map"),
    "map_to_ints": (lambda p: p.write_text('{"weight_map": {"lm_head.weight": 3}}'), "weight_map must map"),
    "no_map": (lambda p: p.write_text('{"metadata": {}}'), "weight_map must map"),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_malformed_index(case, ckpt):
    make, message = INDEX_CASES[case]
    make(ckpt / weights.INDEX_FILE)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsCheckpoint(ckpt)


# --- 2. output safety ----------------------------------------------------------------------------------------
def test_output_equal_to_or_containing_the_input_is_refused(ckpt, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    for out in (ckpt, tmp_path, link):
        with pytest.raises(DeployError, match="would delete it"):
            with fsutil.atomic_directory(out, overwrite=True, protect=[ckpt]):
                pass
    with pytest.raises(DeployError, match="would delete it"):  # write_checkpoint protects its source itself
        write_checkpoint(SafetensorsCheckpoint(ckpt), tmp_path, overwrite=True)
    assert SafetensorsCheckpoint(ckpt).config == tiny_config()
    assert listing(tmp_path) == ["ckpt", "link"]


def test_output_is_never_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for out in (".", "..", tmp_path, "/"):
        with pytest.raises(DeployError, match="current directory"):
            fsutil.check_output_dir(out, overwrite=True)
    assert listing(tmp_path) == ["work"]


def test_output_created_during_the_export_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DeployError, match="created or filled by something else"):
        with fsutil.atomic_directory(out) as tmp:
            (tmp / "new").write_text("new")
            out.mkdir()
            (out / "precious").write_text("keep")
    assert listing(tmp_path) == ["out"] and listing(out) == ["precious"]
    with fsutil.atomic_directory(tmp_path / "empty") as tmp:  # an empty directory appearing is fine
        (tmp / "new").write_text("new")
        (tmp_path / "empty").mkdir()
    assert listing(tmp_path / "empty") == ["new"]


def test_two_writers_of_one_output_cannot_both_win(tmp_path):
    out = tmp_path / "out"
    with fsutil.atomic_directory(out) as tmp:
        (tmp / "first").write_text("1")
        with pytest.raises(DeployError, match="another process is writing output"):
            with fsutil.atomic_directory(out, overwrite=True):
                pass
    assert listing(tmp_path) == ["out"] and listing(out) == ["first"]  # lock file gone too


SIGTERM_SCRIPT = """
import os, signal, sys
from llama3_deploy import fsutil
handler = signal.getsignal(signal.SIGTERM)
try:
    with fsutil.atomic_directory(sys.argv[1], overwrite=True) as tmp:
        (tmp / "half").write_text("written")
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()
finally:
    assert signal.getsignal(signal.SIGTERM) is handler
"""


def test_sigterm_mid_export_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("keep")
    proc = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert listing(tmp_path) == ["out"] and listing(out) == ["precious"]


def test_mount_point_output_is_refused_before_work(tmp_path, monkeypatch):
    out = tmp_path / "mnt"
    out.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real_ismount(p))
    with pytest.raises(DeployError, match="is a mount point"):
        fsutil.check_output_dir(out, overwrite=True)
    assert listing(tmp_path) == ["mnt"]


def test_rename_failure_keeps_the_old_output_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("keep")
    real = fsutil.rename_noreplace

    def busy(src, dst):  # what renaming a bind mount does
        if Path(src) == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        real(src, dst)

    monkeypatch.setattr(fsutil, "rename_noreplace", busy)
    with pytest.raises(DeployError, match=f"cannot move the finished export into place at {out}"):
        with fsutil.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
    assert listing(tmp_path) == ["out"] and listing(out) == ["precious"]


def test_symlinked_output_replaces_its_target_and_leaves_no_link_behind(tmp_path):
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    (target / "old").write_text("old")
    link.symlink_to(target)
    for _ in range(2):
        with fsutil.atomic_directory(link, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
    assert link.is_symlink() and listing(target) == ["new"] and listing(tmp_path) == ["link", "target"]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DeployError, match="dangling symlink"):
        fsutil.check_output_dir(tmp_path / "dangling")


def test_unusable_output_parents(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, message in ((tmp_path / "file" / "out", "is a file"), (tmp_path / "dangling" / "out", "dangling")):
        with pytest.raises(DeployError, match=message):
            with fsutil.atomic_directory(out):
                pass
    monkeypatch.setattr(fsutil.tempfile, "mkdtemp", lambda **kw: (_ for _ in ()).throw(
        OSError(errno.EROFS, os.strerror(errno.EROFS))))
    with pytest.raises(DeployError, match="Read-only file system"):
        with fsutil.atomic_directory(tmp_path / "ro"):
            pass
    monkeypatch.undo()
    with pytest.raises(DeployError, match=f"cannot write the output {tmp_path / 'full'}: No space left"):
        with fsutil.atomic_directory(tmp_path / "full") as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.onnx.data"))
    assert listing(tmp_path) == ["dangling", "file"]


# --- 3. config hardening -------------------------------------------------------------------------------------
CONFIG_CASES = {  # field: (value, what the message must say)
    "layers_huge": ("num_hidden_layers", 10 ** 9, f"num_hidden_layers 1000000000 exceeds the cap of {MAX_LAYERS}"),
    "positions_huge": ("max_position_embeddings", 10 ** 18, "max_position_embeddings 1000000000000000000 exceeds"),
    "vocab_huge": ("vocab_size", 10 ** 12, "vocab_size 1000000000000 exceeds"),
    "vocab_bool": ("vocab_size", True, "vocab_size must be a positive integer"),
    "kv_heads_zero": ("num_key_value_heads", 0, "num_key_value_heads must be a positive integer"),
    "head_dim_zero": ("head_dim", 0, "head_dim must be a positive integer"),
    "rope_string": ("rope_scaling", "llama3", "rope_scaling must be an object"),
    "rope_list": ("rope_scaling", [8.0], "rope_scaling must be an object"),
    "rope_factor_zero": ("rope_scaling", {"rope_type": "llama3", "factor": 0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         "rope_scaling.factor must be a finite number >= 1"),
    "rope_factors_equal": ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                           "high_freq_factor (4.0) must exceed"),
    "theta_null": ("rope_theta", None, "rope_theta must be a finite number"),
    "theta_zero": ("rope_theta", 0, "rope_theta must be a finite number >= 1"),
    "eps_string": ("rms_norm_eps", "abc", "rms_norm_eps must be a finite number > 0"),
    "eps_nan": ("rms_norm_eps", math.nan, "rms_norm_eps must be a finite number > 0"),
    "eos_string": ("eos_token_id", "x", "eos_token_id must be an integer or a list"),
    "eos_outside_vocab": ("eos_token_id", [1, 512], "within the vocabulary [0, 512)"),
    "tie_string": ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false"),
    "archs_int": ("architectures", 5, "unsupported architectures 5"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_field_is_named(case, ckpt):
    field, value, message = CONFIG_CASES[case]
    (ckpt / "generation_config.json").unlink()  # eos/bos come from config.json here
    edit_config(ckpt, **{field: value})
    with pytest.raises(DeployError) as info:
        load_config(ckpt)
    assert message in str(info.value) and str(ckpt) in str(info.value)


def test_generation_config_eos_is_checked(ckpt):
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    with pytest.raises(DeployError, match="generation_config.json: eos_token_id must be"):
        load_config(ckpt)


def test_absurd_random_config_is_refused_at_once(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_hf_dict(), "vocab_size": 10 ** 12}))
    with pytest.raises(DeployError, match="vocab_size 1000000000000 exceeds the cap"):
        open_source(f"random:{tmp_path}")


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b'{"a": "\xff"}',
                                     b'{"v": 1' + b"0" * 5000 + b"}"], ids=["deep", "not_utf8", "long_number"])
def test_unreadable_json_is_a_deploy_error(content, tmp_path):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(DeployError, match="config.json is not valid"):
        read_json(tmp_path / "config.json", what="config.json")
    with pytest.raises(DeployError, match="is not a regular file"):
        read_json(tmp_path, what="config.json")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)
FIELDS = sorted(set(tiny_config(rope_scaling=None).to_hf_dict()) | {"rope_scaling", "head_dim"})
ROPE = st.fixed_dictionaries({"rope_type": st.just("llama3")}, optional={
    k: JSON | st.floats(0, 16) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                         "original_max_position_embeddings")})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1, max_size=3), rope=st.none() | ROPE,
       gen=st.none() | st.dictionaries(st.sampled_from(["bos_token_id", "eos_token_id"]), JSON, max_size=2))
def test_fuzzed_configs_parse_or_raise_deploy_error(changes, rope, gen):
    d = {**tiny_config().to_hf_dict(), **changes}
    if rope is not None:
        d["rope_scaling"] = rope
    try:
        config = LlamaConfig.from_hf_dict(d, gen)
    except DeployError:
        return
    assert 0 < config.vocab_size <= 2 ** 21 and 0 < config.num_hidden_layers <= MAX_LAYERS
    assert all(0 <= i < config.vocab_size for i in config.eos_token_ids)
    assert math.isfinite(config.rms_norm_eps) and config.rope_theta >= 1


# --- 4. weights ----------------------------------------------------------------------------------------------
def test_duplicate_tensor_across_files_is_refused(ckpt):
    from safetensors.torch import save_file
    save_file({"model.norm.weight": torch.zeros(64)}, str(ckpt / "zz-stray.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight is in two files.*model.safetensors.*zz-stray"):
        SafetensorsCheckpoint(ckpt)


def _poison(ckpt: Path, name: str, index, value: float) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(ckpt / "model.safetensors")
    tensors[name][index] = value
    save_file(tensors, str(ckpt / "model.safetensors"))


def test_non_finite_weights_are_refused_naming_the_row(ckpt, monkeypatch):
    _poison(ckpt, "model.embed_tokens.weight", (300, 7), math.nan)
    _poison(ckpt, "model.norm.weight", 5, math.inf)
    source = SafetensorsCheckpoint(ckpt)
    table = {e.source: e for e in source.table}
    monkeypatch.setattr(weights, "CONVERT_CHUNK_ROWS", 128)  # the row is found past the first chunk
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight has non-finite .* first in row 300"):
        target_tensor(source, table["model.embed_tokens.weight"], torch.float32)
    with pytest.raises(CheckpointError, match=r"model.norm.weight has non-finite .* first at index 5"):
        target_tensor(source, table["model.norm.weight"], torch.float32)
    target_tensor(source, table["lm_head.weight"], torch.float16)  # finite tensors pass


def test_non_finite_weight_fails_the_export_cleanly(ckpt, tmp_path, capsys):
    _poison(ckpt, "lm_head.weight", (17, 0), -math.inf)
    rc = main(["export", "--model", str(ckpt), "--output", str(tmp_path / "out"), "--quiet", "--flavor", "optimized"])
    assert rc == 2 and "lm_head.weight has non-finite values" in capsys.readouterr().err
    assert listing(tmp_path) == ["ckpt"]
