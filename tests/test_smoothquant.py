"""SmoothQuant folded into existing tensors: the same function, flatter activations, GQA-tied o_proj factors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llama3_deploy.calibration.smoothquant import SmoothedSource, smoothing_factors
from llama3_deploy.errors import DeployError
from llama3_deploy.export.weights import RandomWeights, load_decoder

from .conftest import tiny_config


def _act_max(config, seed=0):
    """Per-input-channel activation maxima with a few strong outlier channels, as LLM activations have."""
    rng = np.random.default_rng(seed)
    widths = {"attn.wq": config.hidden_size, "attn.wo": config.q_size, "mlp.w_gate": config.hidden_size,
              "mlp.w_down": config.intermediate_size}

    def get(target: str) -> np.ndarray:
        v = rng.uniform(0.5, 2.0, widths[target.split(".", 2)[2]]).astype(np.float32)
        v[rng.choice(v.size, 3, replace=False)] *= 50.0
        return v
    return get


def _logits(source, config, ids):
    model = load_decoder(source)
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        logits, *present = model(ids, mask, pos, *model.empty_past(ids.shape[0]))
    return logits, present


@pytest.mark.parametrize("heads,kv", [(4, 2), (8, 1), (4, 4)])
def test_smoothed_weights_compute_the_same_function(heads, kv):
    config = tiny_config(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=64, head_dim=16)
    source = RandomWeights(config, seed=3, dtype="float32")
    smoothing = smoothing_factors(source, _act_max(config), alpha=0.5)
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    ref, ref_present = _logits(source, config, ids)
    got, got_present = _logits(SmoothedSource(source, smoothing), config, ids)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4)
    assert torch.allclose(got_present[0], ref_present[0], atol=1e-5)  # keys are untouched
    assert not torch.allclose(got_present[1], ref_present[1])          # values carry the o_proj factors


def test_o_proj_factors_are_tied_across_a_kv_group():
    config = tiny_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, head_dim=16)
    s = smoothing_factors(RandomWeights(config, seed=1, dtype="float32"), _act_max(config), groups=("o",))
    o = s.columns["model.layers.0.self_attn.o_proj.weight"].reshape(2, 4, 16)  # [K, G, D]
    assert np.array_equal(o, np.broadcast_to(o[:, :1], o.shape))
    assert np.array_equal(s.rows["model.layers.0.self_attn.v_proj.weight"].reshape(2, 16), o[:, 0])


def test_smoothing_flattens_the_activation_outliers():
    config = tiny_config()
    act = _act_max(config)
    s = smoothing_factors(RandomWeights(config, seed=1, dtype="float32"), act, alpha=0.8, groups=("qkv",))
    x = _act_max(config)("layers.0.attn.wq")  # the same draw as the factors saw
    flat = x / s.columns["model.layers.0.self_attn.q_proj.weight"]
    assert flat.max() / np.median(flat) < x.max() / np.median(x) / 5


def test_bad_options_are_refused():
    source = RandomWeights(tiny_config(), seed=1, dtype="float32")
    for alpha in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(DeployError, match="alpha"):
            smoothing_factors(source, _act_max(source.config), alpha=alpha)
    with pytest.raises(DeployError, match="groups"):
        smoothing_factors(source, _act_max(source.config), groups=("lm_head",))
