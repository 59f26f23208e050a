"""The export-friendly decoder (PyTorch) against transformers' LlamaForCausalLM: logits and KV cache."""
from __future__ import annotations

import pytest
import torch

from llama3_deploy.export.weights import RandomWeights, load_decoder
from tests.conftest import PARITY_CONFIGS, tiny_config, write_random_checkpoint

ATOL = 1e-4


def hf_model(path):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_kv(cache):
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def left_padded(config, batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    for row in range(1, batch):
        mask[row, :row * 2] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_and_kv_match_transformers(name, tmp_path):
    config = PARITY_CONFIGS[name]
    ckpt = write_random_checkpoint(tmp_path / name, config, seed=7)
    ours = load_decoder(RandomWeights(config, seed=7, dtype="float32"))
    ref = hf_model(ckpt)
    ids, mask, pos = left_padded(config)
    if config.rope_scaling is not None:  # positions beyond original_max_position_embeddings (32)
        pos = pos + 200
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        logits, *present = ours(ids, mask, pos, *ours.empty_past(ids.shape[0]))
    valid = mask.bool()  # padded query positions are don't-care in both implementations
    assert (out.logits - logits)[valid].abs().max() <= ATOL
    for a, b in zip(hf_kv(out.past_key_values), present):
        assert (a - b).abs().max() <= ATOL

    # one decode step fed the cache
    nxt = torch.tensor([[11], [12], [13]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.int64)], 1)
    pos2 = pos[:, -1:] + 1
    with torch.no_grad():
        out2 = ref(input_ids=nxt, attention_mask=mask2, position_ids=pos2, past_key_values=out.past_key_values,
                   use_cache=True)
        logits2, *present2 = ours(nxt, mask2, pos2, *present)
    assert (out2.logits - logits2).abs().max() <= ATOL
    for a, b in zip(hf_kv(out2.past_key_values), present2):
        assert (a - b).abs().max() <= ATOL


def test_prefill_equals_single_token_steps():
    config = tiny_config()
    model = load_decoder(RandomWeights(config, seed=3, dtype="float32"))
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_logits, *full_present = model(ids, torch.ones(1, 9, dtype=torch.int64), torch.arange(9)[None],
                                           *model.empty_past(1))
        past = model.empty_past(1)
        for t in range(9):
            step_logits, *past = model(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.int64),
                                       torch.tensor([[t]]), *past)
            assert (step_logits[0, 0] - full_logits[0, t]).abs().max() <= ATOL
    for a, b in zip(past, full_present):
        assert (a - b).abs().max() <= ATOL


def test_left_padded_rows_equal_rows_alone():
    config = tiny_config()
    model = load_decoder(RandomWeights(config, seed=4, dtype="float32"))
    ids, mask, pos = left_padded(config)
    with torch.no_grad():
        batch_logits, *_ = model(ids, mask, pos, *model.empty_past(3))
        for row in range(3):
            keep = mask[row].bool()
            alone, *_ = model(ids[row:row + 1, keep], torch.ones(1, int(keep.sum()), dtype=torch.int64),
                              pos[row:row + 1, keep], *model.empty_past(1))
            assert (alone[0] - batch_logits[row, keep]).abs().max() <= ATOL
