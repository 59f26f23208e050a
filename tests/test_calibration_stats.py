"""Calibration data and activation statistics: determinism, the cache, block-by-block == whole model,
decode steps, the histogram clips, and the user errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llama3_deploy.calibration import data as cdata
from llama3_deploy.calibration import stats as cstats
from llama3_deploy.calibration.data import CalibrationSet, load_calibration_set, token_sha256
from llama3_deploy.calibration.stats import ActivationStats, collect_statistics, linear_groups
from llama3_deploy.errors import DeployError
from llama3_deploy.export.weights import RandomWeights, SafetensorsCheckpoint, load_decoder

from .conftest import tiny_config


def random_set(config, n=5, length=24, seed=0) -> CalibrationSet:
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (n, length))
    seqs = tuple(tuple(int(t) for t in row) for row in ids)
    return CalibrationSet(seqs, length, seed, "test", token_sha256(seqs, length), f"{n} random windows")


def assert_same_stats(a: ActivationStats, b: ActivationStats) -> None:
    assert list(a.groups) == list(b.groups) and list(a.weights) == list(b.weights)
    for name, g in a.groups.items():
        h = b.groups[name]
        assert (g.weights, g.amax, g.amax_decode, g.hist_max, g.tokens) == (h.weights, h.amax, h.amax_decode,
                                                                            h.hist_max, h.tokens), name
        np.testing.assert_array_equal(g.channel_max, h.channel_max)
        np.testing.assert_array_equal(g.hist, h.hist)
    for name, w in a.weights.items():
        np.testing.assert_array_equal(w.out_max, b.weights[name].out_max)
        np.testing.assert_array_equal(w.in_max, b.weights[name].in_max)
    assert a.kv_amax == b.kv_amax and len(a.kv_amax) == 2 * len(a.weights) // 7


# --- data -----------------------------------------------------------------------------------------------
def test_default_set_is_deterministic_and_starts_with_bos(tok_checkpoint):
    a = load_calibration_set(None, model_dir=tok_checkpoint, num_sequences=4, seq_len=64, seed=0)
    b = load_calibration_set(None, model_dir=tok_checkpoint, num_sequences=4, seq_len=64, seed=0)
    c = load_calibration_set(None, model_dir=tok_checkpoint, num_sequences=4, seq_len=64, seed=1)
    assert a == b and a.sha256 == b.sha256 and a.source == "default"
    assert c.sha256 != a.sha256
    from llama3_deploy.runtime.tokenizer import Tokenizer
    bos = Tokenizer.from_dir(tok_checkpoint).bos_id
    assert len(a.sequences) == 4 and all(len(s) == 64 and s[0] == bos for s in a.sequences)
    assert a.as_array().shape == (4, 64)


def test_jsonl_dialogs_and_texts(tok_checkpoint, tmp_path):
    from llama3_deploy.runtime.chat import ChatFormat
    chat = ChatFormat.from_dir(tok_checkpoint)
    tok = chat.tokenizer
    dialog = [{"role": "user", "content": "Type <|eot_id|> here " + "word " * 40},
              {"role": "assistant", "content": "ok " * 40}]
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"messages": dialog}) + "\n\n" + json.dumps({"text": "short", "id": 3}) + "\n")
    s = load_calibration_set(path, model_dir=tok_checkpoint, num_sequences=8, seq_len=32)
    # the long dialog gives its own windows, BOS-prefixed; typed control-token text stays text
    body = chat.encode_dialog(dialog, add_generation_prompt=False)[1:]
    assert s.sequences[0] == (tok.bos_id, *body[:31])
    assert s.sequences[0].count(tok.special_tokens["<|eot_id|>"]) == 0
    assert len(s.sequences) == len(body) // 31 and "only" in s.description  # fewer than asked: all, said so


def test_long_text_pieces_encode_like_one_string(tok_checkpoint, monkeypatch):
    from llama3_deploy.calibration.demo_tokenizer import corpus_files, read_corpus
    from llama3_deploy.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tok_checkpoint)
    text = "".join(read_corpus(corpus_files(0)[:40], max_chars=60_000))
    whole = cdata._encode_text(tok, text)
    monkeypatch.setattr(cdata, "TEXT_PIECE_CHARS", 500)
    assert cdata._encode_text(tok, text) == whole


def test_txt_file(tok_checkpoint, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 30)
    s = load_calibration_set(path, model_dir=tok_checkpoint, num_sequences=2, seq_len=16, seed=3)
    assert len(s.sequences) == 2 and s.source == str(path)


@pytest.mark.parametrize("content, kwargs, message", [
    ("", {}, "is empty"),
    ("  \n\n", {}, "is empty"),
    ('{"text": "a"}\n{"text": "b"\n', {}, "line 2: malformed JSON"),
    ('{"text": "a"}\n[1, 2]\n', {}, "line 2: each line must be an object"),
    ('{"messages": [{"role": "user"}]}\n', {}, "line 1: message 0 has no 'content'"),
    ('{"text": 5}\n', {}, "line 1: \"text\" must be a string"),
    ('{"text": "hello"}\n', {}, "not enough for one sequence"),
    ('{"text": "hello"}\n', {"seq_len": 300}, "over the model's context of 256"),
    ('{"text": "hello"}\n', {"num_sequences": 0}, "num_sequences must be a positive integer"),
    ('{"text": "hello"}\n', {"num_sequences": 5000}, "over the limit of 4096"),
    ('{"text": "hello"}\n', {"seq_len": -1}, "seq_len must be a positive integer"),
])
def test_bad_calibration_files(tok_checkpoint, tmp_path, content, kwargs, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(DeployError, match=message):
        load_calibration_set(path, model_dir=tok_checkpoint, **{"seq_len": 64, **kwargs})


def test_bad_paths_and_missing_tokenizer(tok_checkpoint, tiny_checkpoint, tmp_path):
    with pytest.raises(DeployError, match="no tokenizer in"):
        load_calibration_set(None, model_dir=tiny_checkpoint, seq_len=16)
    with pytest.raises(DeployError, match="not found"):
        load_calibration_set(tmp_path / "missing.jsonl", model_dir=tok_checkpoint, seq_len=16)
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(DeployError, match="unsupported calibration file"):
        load_calibration_set(tmp_path / "c.csv", model_dir=tok_checkpoint, seq_len=16)


# --- statistics -----------------------------------------------------------------------------------------
def test_groups_cover_every_quantized_weight():
    for config in (tiny_config(), tiny_config(tie_word_embeddings=True)):
        groups = linear_groups(config)
        assert groups["layers.1.attn.qkv"] == ("layers.1.attn.wq", "layers.1.attn.wk", "layers.1.attn.wv")
        assert groups["layers.0.mlp.gate_up"] == ("layers.0.mlp.w_gate", "layers.0.mlp.w_up")
        assert ("lm_head" in groups) == (not config.tie_word_embeddings)
        assert len(groups) == 4 * config.num_hidden_layers + (not config.tie_word_embeddings)


@torch.no_grad()
def hooked_reference(source, calib, decode_steps):
    """amax / decode amax / channel max / token count per group from hooks on the whole LlamaDecoder,
    running one batched prefill and then single-token decode steps."""
    import torch.nn.functional as F
    from llama3_deploy.export.model import apply_rope
    model = load_decoder(source)
    c, ref, phase = model.config, {}, {"decode": False}

    def record(group, x):
        a = x.abs().reshape(-1, x.shape[-1])
        r = ref.setdefault(group, {"amax": 0.0, "amax_decode": 0.0, "ch": torch.zeros(x.shape[-1]), "tokens": 0})
        r["amax"] = max(r["amax"], float(a.max()))
        r["amax_decode"] = max(r["amax_decode"], float(a.max())) if phase["decode"] else r["amax_decode"]
        r["ch"] = torch.maximum(r["ch"], a.amax(0))
        r["tokens"] += a.shape[0]

    def attn_hook(i):
        def hook(m, args, out):  # recompute wo's input with torch's own attention (an independent kernel)
            x, cos, sin, mask, pk, pv = args
            b, s, _ = x.shape
            q = apply_rope((x @ m.wq).view(b, s, c.num_attention_heads, c.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope((x @ m.wk).view(b, s, c.num_key_value_heads, c.head_dim).transpose(1, 2), cos, sin)
            v = (x @ m.wv).view(b, s, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            record(f"layers.{i}.attn.qkv", x)
            record(f"layers.{i}.attn.wo", o.transpose(1, 2).reshape(b, s, -1))
        return hook

    def mlp_hook(i):
        def hook(m, args):
            x = args[0]
            record(f"layers.{i}.mlp.gate_up", x)
            record(f"layers.{i}.mlp.w_down", F.silu(x @ m.w_gate) * (x @ m.w_up))
        return hook

    for i, layer in enumerate(model.layers):
        layer.attn.register_forward_hook(attn_hook(i))
        layer.mlp.register_forward_pre_hook(mlp_hook(i))
    model.norm.register_forward_hook(lambda m, args, out: record("lm_head", out))
    ids = torch.from_numpy(calib.as_array())
    n, length = ids.shape
    prefill = length - decode_steps
    _, *past = model(ids[:, :prefill], torch.ones(n, prefill, dtype=torch.int64),
                     torch.arange(prefill).expand(n, -1), *model.empty_past(n))
    phase["decode"] = True
    for t in range(prefill, length):
        _, *past = model(ids[:, t:t + 1], torch.ones(n, t + 1, dtype=torch.int64),
                         torch.full((n, 1), t), *past)
    for i in range(len(model.layers)):  # the final cache holds every position's key (after RoPE) and value
        ref[f"layers.{i}.key"], ref[f"layers.{i}.value"] = (float(t.abs().max()) for t in past[2 * i:2 * i + 2])
    return ref


def test_block_by_block_equals_whole_model_with_decode_steps(monkeypatch):
    config = tiny_config()
    source = RandomWeights(config, seed=3, dtype="float32")
    calib = random_set(config, n=5, length=24)
    monkeypatch.setattr(cstats, "DECODE_BATCH", 3)  # decode groups of 3, prefill batches of 2 inside them
    stats = collect_statistics(source, calib, decode_steps=4, batch=2)
    ref = hooked_reference(source, calib, decode_steps=4)
    kv = {k: ref.pop(k) for k in list(ref) if k.endswith((".key", ".value"))}
    assert set(ref) == set(stats.groups) and set(kv) == set(stats.kv_amax)
    for name, amax in kv.items():
        assert math.isclose(stats.kv_amax[name], amax, rel_tol=1e-6) and amax > 0, name
    for name, r in ref.items():
        g = stats.groups[name]
        assert g.tokens == r["tokens"] == 5 * 24, name  # every prefill and decode token
        assert math.isclose(g.amax, r["amax"], rel_tol=1e-6), name
        assert math.isclose(g.amax_decode, r["amax_decode"], rel_tol=1e-6) and g.amax_decode > 0, name
        np.testing.assert_allclose(g.channel_max, r["ch"].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
        assert int(g.hist.sum()) == g.tokens * g.channel_max.shape[0]
    model = load_decoder(source)
    for i, layer in enumerate(model.layers):
        np.testing.assert_array_equal(stats.weights[f"layers.{i}.mlp.w_down"].out_max,
                                      layer.mlp.w_down.detach().abs().amax(0).numpy())
        np.testing.assert_array_equal(stats.weights[f"layers.{i}.attn.wk"].in_max,
                                      layer.attn.wk.detach().abs().amax(1).numpy())
    np.testing.assert_array_equal(stats.weights["lm_head"].out_max, model.lm_head.detach().abs().amax(0).numpy())


def test_decode_steps_are_collected():
    config = tiny_config()
    source = RandomWeights(config, seed=3, dtype="float32")
    calib = random_set(config, n=4, length=24)
    with_decode = collect_statistics(source, calib, decode_steps=4, batch=4)
    no_decode = collect_statistics(source, calib, decode_steps=0, batch=4)
    seqs = tuple(s[:20] for s in calib.sequences)  # what a prefill-only calibration of the prompts would see
    prompts_only = collect_statistics(
        source, CalibrationSet(seqs, 20, 0, "test", token_sha256(seqs, 20), "prompts"), decode_steps=0, batch=4)
    assert all(g.amax_decode == 0 for g in no_decode.groups.values())
    assert all(g.amax_decode > 0 for g in with_decode.groups.values())
    # Teacher-forced decode steps through the KV cache reproduce the full-length prefill to rounding ...
    for name, g in with_decode.groups.items():
        assert math.isclose(g.amax, no_decode.groups[name].amax, rel_tol=1e-5), name
        np.testing.assert_allclose(g.channel_max, no_decode.groups[name].channel_max, rtol=1e-5, atol=1e-7)
    # ... and add what the prompts alone lack.
    assert any(not np.array_equal(g.channel_max, prompts_only.groups[n].channel_max)
               for n, g in with_decode.groups.items())
    assert all(g.tokens == 4 * 24 for g in with_decode.groups.values())


def test_statistics_are_deterministic_and_the_cache_round_trips(tmp_path):
    config = tiny_config()
    source = RandomWeights(config, seed=3, dtype="float32")
    calib = random_set(config)
    a = collect_statistics(source, calib, decode_steps=3, batch=2)
    b = collect_statistics(RandomWeights(config, seed=3, dtype="float32"), random_set(config), decode_steps=3)
    assert_same_stats(a, b)  # batching does not change the histograms either
    path = a.save(tmp_path / "stats.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]  # no temporary left behind
    assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(DeployError, match="cannot write the calibration cache"):
        a.save(tmp_path / "missing" / "stats.npz")
    loaded = ActivationStats.load(path, expect_model=source, expect_data=calib, expect_decode_steps=3)
    assert_same_stats(a, loaded)
    assert (loaded.seq_len, loaded.decode_steps, loaded.num_sequences) == (24, 3, 5)
    assert loaded.group_of("layers.1.attn.wv") is loaded.groups["layers.1.attn.qkv"]
    assert loaded.groups["layers.0.mlp.w_down"].mse_clip() == a.groups["layers.0.mlp.w_down"].mse_clip()
    clips = loaded.input_amax("mse")
    assert set(clips) == {w for ws in linear_groups(config).values() for w in ws}
    assert clips["layers.0.attn.wk"] == clips["layers.0.attn.wq"] == loaded.groups["layers.0.attn.qkv"].mse_clip()
    assert all(loaded.input_amax("percentile")[w] <= v for w, v in loaded.input_amax().items())

    with pytest.raises(DeployError, match="another model"):
        ActivationStats.load(path, expect_model=RandomWeights(config, seed=4, dtype="float32"), expect_data=calib)
    with pytest.raises(DeployError, match="another model"):
        ActivationStats.load(path, expect_model=RandomWeights(tiny_config(num_hidden_layers=3), seed=3,
                                                              dtype="float32"), expect_data=None)
    with pytest.raises(DeployError, match="other calibration data"):
        ActivationStats.load(path, expect_model=a.model_identity, expect_data=random_set(config, seed=1))
    with pytest.raises(DeployError, match="decode steps"):
        ActivationStats.load(path, expect_model=None, expect_data=None, expect_decode_steps=16)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DeployError, match="corrupt or not a cache"):
        ActivationStats.load(tmp_path / "junk.npz", expect_model=None, expect_data=None)
    np.savez(tmp_path / "pickled.npz", meta_json=np.array([{"format": cstats.FORMAT}], dtype=object))
    with pytest.raises(DeployError, match="corrupt or not a cache"):  # object arrays are never unpickled
        ActivationStats.load(tmp_path / "pickled.npz", expect_model=None, expect_data=None)


def test_end_to_end_on_a_checkpoint_with_its_tokenizer(tok_checkpoint, tmp_path):
    calib = load_calibration_set(None, model_dir=tok_checkpoint, num_sequences=3, seq_len=32)
    source = SafetensorsCheckpoint(tok_checkpoint)
    stats = collect_statistics(source, calib, decode_steps=4)
    loaded = ActivationStats.load(stats.save(tmp_path / "s.npz"), expect_model=SafetensorsCheckpoint(tok_checkpoint),
                                  expect_data=load_calibration_set(None, model_dir=tok_checkpoint, num_sequences=3,
                                                                   seq_len=32))
    assert loaded.info["data_source"] == "default" and loaded.groups["lm_head"].tokens == 3 * 32


def test_collect_statistics_refuses_bad_arguments():
    config = tiny_config()
    source, calib = RandomWeights(config, dtype="float32"), random_set(config, length=8)
    for kwargs, message in (({"decode_steps": 8}, "decode_steps"), ({"decode_steps": -1}, "decode_steps"),
                            ({"batch": 0, "decode_steps": 2}, "batch must")):
        with pytest.raises(DeployError, match=message):
            collect_statistics(source, calib, **kwargs)
    over = tuple((config.vocab_size,) * 8 for _ in range(2))
    with pytest.raises(DeployError, match="outside the vocabulary"):
        collect_statistics(source, CalibrationSet(over, 8, 0, "t", token_sha256(over, 8), "t"), decode_steps=2)


# --- histogram clips ------------------------------------------------------------------------------------
def feed(values: np.ndarray, pieces: int) -> cstats.GroupStats:
    acc = cstats._Accumulator(("w",), values.shape[-1])
    for part in np.array_split(values, pieces):
        acc.add(torch.from_numpy(part), decode=False)
    return acc.result()


def test_percentile_and_mse_clip_on_a_heavy_tailed_distribution():
    x = np.random.default_rng(0).standard_t(df=3, size=(20000, 50)).astype(np.float32)
    a = np.abs(x).astype(np.float64).ravel()
    g = feed(x, 7)
    assert_same = feed(x, 1)
    np.testing.assert_array_equal(g.hist, assert_same.hist)  # growing the range merges bins exactly
    assert g.amax == float(a.max()) and g.hist.sum() == a.size
    bin_width = g.hist_max / cstats.HIST_BINS
    for q in (50, 99, 99.9, 99.99):
        assert abs(g.percentile(q) - np.percentile(a, q)) <= bin_width, q
    clip = g.mse_clip()
    assert np.percentile(a, 99) <= clip <= g.amax
    assert clip < 0.5 * g.amax  # the tail is heavy: saturating it beats coarse steps everywhere

    def int8_mse(c):
        s = c / 127
        return float(np.mean((a - np.clip(np.round(a / s), -127, 127) * s) ** 2))
    assert int8_mse(clip) < int8_mse(g.amax) and int8_mse(clip) < int8_mse(np.percentile(a, 99))


def test_clips_of_all_zero_and_tiny_inputs():
    z = feed(np.zeros((10, 4), np.float32), 2)
    assert (z.amax, z.percentile(), z.mse_clip(), int(z.hist[0])) == (0.0, 0.0, 0.0, 40)
    one = feed(np.full((3, 2), 0.75, np.float32), 1)
    assert one.hist_max == 1.0 and one.percentile(100) == 0.75 and one.mse_clip() == 0.75
