"""SmoothQuant: move activation outliers into the weights, folded into existing tensors so the graph gains no op.

For a projection y = x W (x [..., in], W [in, out]) and a per-input-channel factor s [in]:
    y = (x / s) (diag(s) W)
with s_j = max|x_j|^alpha / max_k |W_jk|^(1 - alpha) (Xiao et al., SmoothQuant, eq. 4): activations get flatter
(easy per-tensor INT8/FP8), weights absorb the range (per-output-channel scales handle it). Both halves are
folded where the values are made, so the exported graph is the plain portable graph with other numbers:
    group       consumers (input columns x s)       producer of x (output channels / s)
    qkv         q_proj, k_proj, v_proj              input_layernorm weight
    gate_up     gate_proj, up_proj                  post_attention_layernorm weight
    down        down_proj                           up_proj rows (x = silu(gate) * up is linear in up)
    o           o_proj                              v_proj rows (the attention output is a convex
                                                    combination of value rows)
GQA shapes the o case: attention output channel (head h, dim d) is built from value channel (h // G, d), one
value head shared by the G query heads of its group, so dividing value channel (k, d) by s scales the output
channels (h, d) of all G heads alike: s is computed per (kv head, dim) from the maxima over the group's heads
and repeated G times along o_proj's input. The output head is not smoothed (its input feeds the logits, which
stay in the graph dtype in TensorRT recipes too). Weights are in Hugging Face layout here ([out, in]):
consumers scale columns, producers scale rows.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from llama3_deploy.config import LlamaConfig
from llama3_deploy.errors import DeployError
from llama3_deploy.export.weights import WeightSource, name_table

GROUPS = ("qkv", "o", "gate_up", "down")
FACTOR_RANGE = (1e-5, 1e5)  # a channel that never fires (max 0) keeps s = 1; others are clamped to this range


def _hf(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    return {"q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
            "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight", "down": p + "mlp.down_proj.weight",
            "attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight"}


def _target(layer: int, group: str) -> str:
    """The decoder weight (export/weights.name_table target) whose input activation the group smooths."""
    return {"qkv": f"layers.{layer}.attn.wq", "o": f"layers.{layer}.attn.wo",
            "gate_up": f"layers.{layer}.mlp.w_gate", "down": f"layers.{layer}.mlp.w_down"}[group]


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """Per-layer factors; `columns[name]` multiplies a weight's input columns, `rows[name]` divides a tensor's
    output channels (rows of a 2-D weight, elements of a norm vector). Both keyed by Hugging Face name."""

    method: dict  # {"method": "smoothquant", "alpha": ...} or AWQ's record
    groups: tuple[str, ...]
    columns: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]

    @property
    def alpha(self) -> float | None:
        return self.method.get("alpha")

    def to_json(self) -> dict:
        return {**self.method, "groups": list(self.groups),
                "o_proj_gqa": "factors per (kv head, dim), repeated over the query heads of each group"}


def weight_input_max(source: WeightSource, name: str, rows: int, chunk: int = 4096) -> np.ndarray:
    """max_k |W[k, j]| per input channel j of a Hugging Face [out, in] weight, streamed in row chunks."""
    out = None
    for lo in range(0, rows, chunk):
        part = source.get_rows(name, lo, min(lo + chunk, rows)).float().abs().amax(dim=0).numpy()
        out = part if out is None else np.maximum(out, part)
    return out


def _factor(act: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    act, weight = np.asarray(act, np.float64), np.asarray(weight, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = act ** alpha / weight ** (1.0 - alpha)
    s = np.where((act > 0) & (weight > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, *FACTOR_RANGE).astype(np.float32)


def build_smoothing(source: WeightSource, act_channel_max: Callable[[str], np.ndarray], factor: Callable, *,
                    groups: tuple[str, ...], method: dict) -> Smoothing:
    """Per-group factors from `factor(act, consumers, reduce, expand) -> s`, folded as the table above says.

    `act` is the group's per-input-channel activation maximum, reduced to the space its factors live in
    (per (kv head, dim) for o_proj, whose query heads share a value head; the input channels otherwise);
    `consumers` are the Hugging Face names of the weights reading that input; `reduce` / `expand` map an
    input-width vector to that space and back. SmoothQuant and AWQ differ only in `factor`.
    """
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise DeployError(f"unknown smoothing groups {unknown}; choose from {', '.join(GROUPS)}")
    c: LlamaConfig = source.config
    K, D, G = c.num_key_value_heads, c.head_dim, c.gqa_ratio
    same = lambda v: np.asarray(v)  # noqa: E731
    per_kv = lambda v: np.asarray(v).reshape(K, G, D).max(axis=1).reshape(-1)  # noqa: E731  [H*D] -> [K*D]
    per_q = lambda v: np.repeat(np.asarray(v).reshape(K, 1, D), G, axis=1).reshape(-1)  # noqa: E731  [K*D] -> [H*D]
    columns: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}
    for i in range(c.num_hidden_layers):
        hf = _hf(i)
        for g in groups:
            consumers, producer = {"qkv": (("q", "k", "v"), "attn_norm"), "gate_up": (("gate", "up"), "mlp_norm"),
                                   "down": (("down",), "up"), "o": (("o",), "v")}[g]
            reduce, expand = (per_kv, per_q) if g == "o" else (same, same)
            act = reduce(np.asarray(act_channel_max(_target(i, g)), np.float32))
            s = np.asarray(factor(act, [hf[n] for n in consumers], reduce, expand), np.float32)
            columns.update({hf[n]: expand(s) for n in consumers})
            rows[hf[producer]] = s  # a norm's elements, or up_proj / v_proj output rows
    return Smoothing(method, tuple(groups), columns, rows)


def smoothing_factors(source: WeightSource, act_channel_max: Callable[[str], np.ndarray], *, alpha: float = 0.5,
                      groups: tuple[str, ...] = GROUPS) -> Smoothing:
    """SmoothQuant factors for every layer from calibrated per-input-channel activation maxima.

    `act_channel_max(target)` gives max |x_j| of the input of decoder weight `target` (e.g. "layers.0.attn.wq"
    for the q/k/v input): one vector of that weight's input width.
    """
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.0 <= alpha <= 1.0):
        raise DeployError(f"SmoothQuant alpha must be a number in [0, 1] (got {alpha!r})")
    shapes = {e.source: e.source_shape for e in name_table(source.config)}

    def factor(act, consumers, reduce, expand):
        w = np.max([weight_input_max(source, n, shapes[n][0]) for n in consumers], axis=0)
        return _factor(act, reduce(w), alpha)

    return build_smoothing(source, act_channel_max, factor, groups=groups,
                           method={"method": "smoothquant", "alpha": float(alpha)})


class SmoothedSource:
    """A weight source whose tensors read back smoothed (fp32): the graph built from it computes the same
    function with flatter activations. Validation's streamed reference reads it too, so they agree."""

    def __init__(self, source: WeightSource, smoothing: Smoothing):
        self.source, self.smoothing, self.config = source, smoothing, source.config
        self.description = f"{source.description}, smoothed ({smoothing.method['method']})"
        self.shapes = {e.source: e.source_shape for e in name_table(source.config)}

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.source.get_rows(name, start, stop)
        col, row = self.smoothing.columns.get(name), self.smoothing.rows.get(name)
        if col is None and row is None:
            return t
        t = t.float()
        if col is not None:
            t = t * torch.from_numpy(col)[None, :]
        if row is not None:
            r = torch.from_numpy(row[start:start + t.shape[0]])
            t = t / (r[:, None] if t.dim() == 2 else r)
        return t

    def get(self, name: str) -> torch.Tensor:
        return self.get_rows(name, 0, self.shapes[name][0])
