"""AWQ for INT4 weights: activation-aware factors that never lose to round-to-nearest on the proxy, fold into the
same tensors as SmoothQuant (same function unquantized), and lower the error on channels with large inputs."""
from __future__ import annotations

import numpy as np
import torch

from llama3_deploy.calibration.awq import _search, awq_factors
from llama3_deploy.calibration.smoothquant import SmoothedSource
from llama3_deploy.export.quantize import QuantSpec, dequantize_matrix, quantize_matrix
from llama3_deploy.export.weights import RandomWeights, load_decoder

from .conftest import tiny_config

SPEC = QuantSpec(bits=4, block_size=16, symmetric=True)


def _proxy(w, a, s):
    q = dequantize_matrix(quantize_matrix((w * s[:, None]).astype(np.float32), SPEC), *w.shape, SPEC) / s[:, None]
    return float((((a * a)[:, None]) * (q - w) ** 2).sum())


def test_search_beats_round_to_nearest_when_a_few_inputs_are_large():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (64, 48)).astype(np.float32)
    act = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    act[[3, 17, 40]] *= 40.0  # outlier channels, as LLM activations have
    s, alpha, err = _search(act, w, SPEC, lambda v: v, grid=11)
    rtn = _proxy(w, act, np.ones(64))
    assert alpha > 0 and err < 0.8 * rtn and abs(err - _proxy(w, act, s)) < 1e-6 * rtn


def test_awq_factors_compute_the_same_function_before_quantization():
    config = tiny_config(num_attention_heads=4, num_key_value_heads=2)
    source = RandomWeights(config, seed=2, dtype="float32")
    rng = np.random.default_rng(1)
    widths = {"wq": config.hidden_size, "wo": config.q_size, "w_gate": config.hidden_size,
              "w_down": config.intermediate_size}
    act = lambda t: rng.uniform(0.5, 5.0, widths[t.rsplit(".", 1)[1]]).astype(np.float32)  # noqa: E731
    smoothing = awq_factors(source, act, spec=SPEC)
    assert smoothing.method["method"] == "awq" and len(smoothing.method["alphas"]) == 4 * config.num_hidden_layers
    ids = torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    mask, pos = torch.ones_like(ids), torch.arange(5)[None]
    with torch.no_grad():
        ref = load_decoder(source)(ids, mask, pos, *load_decoder(source).empty_past(1))[0]
        model = load_decoder(SmoothedSource(source, smoothing))
        got = model(ids, mask, pos, *model.empty_past(1))[0]
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4)
