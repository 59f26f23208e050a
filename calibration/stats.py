"""Activation and weight statistics for static quantization, on the project's own decoder in fp32.

Streaming: one block is resident at a time (as `export.validate.streamed_reference`), so the 8B fits a 24 GB
machine. All sequences pass through block i before block i + 1 is loaded; what is kept between blocks is the
hidden state of every token, N x L x E fp32 (8B, N=32, L=512: 256 MiB). Within a block, sequences go in
groups of max(batch, DECODE_BATCH): each group is prefilled in batches of `batch` (the [b, H, P, P] fp32
scores bound it: 128 MiB at b=4, P=512 for the 8B; the MLP's [b, P, I] is 112 MiB), its K/V kept
([G, K, P, D] x 2: 128 MiB for the 8B at G=32, P=512), then its decode steps run for the whole group at once,
since a one-token step costs a full read of the block's weights. With the fp32 block (0.9 GB for the 8B) the
peak is a few GB; measured in benchmarks/results/calibration-8b-stats.md.

Decoding is part of the data: each sequence's first `L - decode_steps` tokens run as one prefill, then its
last `decode_steps` tokens run one at a time against the populated past (the S=1 path the decode graph
takes). Block-by-block cannot sample, so the decode tokens are the sequence's own (teacher forcing): the
statistics cover the shapes and positions decoding sees, and a decode step's activations equal what a
full-length prefill computes at that position, up to fp32 rounding.

Captured inputs: the left operand of each quantized MatMul, seen through a TorchFunctionMode that matches
the block's own weight tensors, so the statistics come from `export.model.Block` itself, not a copy of it.

Per input group (weights sharing one input, `linear_groups`):
  amax         max |x| over every element (prefill and decode); `amax_decode` over decode tokens only.
  channel_max  max |x| per input channel [in] (SmoothQuant / AWQ).
  hist         counts of |x| in HIST_BINS equal bins over [0, hist_max), hist_max the smallest power of two
               above amax. Growing the range doubles it, merging bin pairs exactly, and a power-of-two bin
               width makes bin indices exact, so the histogram is the same whatever the batching.
  percentile(q)  the upper edge of the bin where the cumulative count reaches q% (capped at amax):
               never below the q-th percentile, at most one bin above it.
  mse_clip()   the clip c among the bin edges (and amax) minimising the expected symmetric int8 error
               E(c) = sum_inside n * s^2/12 + sum_outside n * (v - c)^2, s = c / 127, v the bin centres
               (round-to-nearest as uniform noise inside, saturation outside).
Per weight (decoder layout [in, out]): out_max [out] and in_max [in], max |w| per output / input channel.
Per layer: kv_amax, max |k| (after RoPE, as cached) and max |v| over every position (a quantized KV cache).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from llama3_deploy.config import LlamaConfig
from llama3_deploy.errors import DeployError
from llama3_deploy.export.model import Block, RMSNorm, additive_mask, rope_cos_sin
from llama3_deploy.export.weights import WeightSource, derived_tensors, name_table, target_tensor

from .data import CalibrationSet

FORMAT = "llama3-deploy activation statistics"
VERSION = 2  # 2: kv_amax
HIST_BINS = 4096          # with a power-of-two range, at least 2048 bins always span [0, amax]
DEFAULT_PERCENTILE = 99.99
INT8_QMAX = 127
# Decode steps run this many sequences at once: a one-token step is bound by reading the block's weights.
DECODE_BATCH = 32
HIST_CHUNK = 1 << 22      # elements binned at once (bounds the int64 index tensor to 32 MiB)
ROW_CHUNK = 4096          # embedding / head rows read at once
# Quantized MatMuls of one layer: weight (decoder name suffix) -> the input group it reads.
LINEAR_INPUTS = {"attn.wq": "attn.qkv", "attn.wk": "attn.qkv", "attn.wv": "attn.qkv", "attn.wo": "attn.wo",
                 "mlp.w_gate": "mlp.gate_up", "mlp.w_up": "mlp.gate_up", "mlp.w_down": "mlp.w_down"}
HEAD = "lm_head"


def linear_groups(config: LlamaConfig) -> dict[str, tuple[str, ...]]:
    """Input group name -> the decoder weight targets (name_table) that multiply that same input."""
    groups: dict[str, tuple[str, ...]] = {}
    for i in range(config.num_hidden_layers):
        for weight, group in LINEAR_INPUTS.items():
            groups[f"layers.{i}.{group}"] = groups.get(f"layers.{i}.{group}", ()) + (f"layers.{i}.{weight}",)
    if not config.tie_word_embeddings:  # a tied head is the embedding, which stays unquantized
        groups[HEAD] = (HEAD,)
    return groups


@dataclasses.dataclass
class GroupStats:
    weights: tuple[str, ...]
    amax: float
    amax_decode: float
    channel_max: np.ndarray  # [in] float32
    hist: np.ndarray         # [HIST_BINS] int64
    hist_max: float
    tokens: int

    def percentile(self, q: float = DEFAULT_PERCENTILE) -> float:
        if not 0 < q <= 100:
            raise DeployError(f"percentile must be in (0, 100] (got {q})")
        total = int(self.hist.sum())
        if total == 0 or self.hist_max == 0:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.hist), q / 100 * total, side="left"))
        return min((min(k, HIST_BINS - 1) + 1) * self.hist_max / HIST_BINS, self.amax)

    def mse_clip(self, qmax: int = INT8_QMAX) -> float:
        if self.amax == 0:
            return 0.0
        w = self.hist_max / HIST_BINS
        n = self.hist.astype(np.float64)
        v = (np.arange(HIST_BINS) + 0.5) * w                       # bin centres
        c = np.minimum((np.arange(HIST_BINS) + 1) * w, self.amax)  # candidate clip k: bins 0..k inside
        # Suffix sums over bins k+1.. (outside candidate k): count, sum v, sum v^2.
        s0, s1, s2 = (np.concatenate([np.cumsum(a[::-1])[::-1][1:], [0.0]]) for a in (n, n * v, n * v * v))
        err = (n.sum() - s0) * (c / qmax) ** 2 / 12 + (s2 - 2 * c * s1 + c * c * s0)
        return float(c[int(np.argmin(err))])


@dataclasses.dataclass
class WeightStats:
    out_max: np.ndarray  # [out] float32
    in_max: np.ndarray   # [in] float32


class _Accumulator:
    """Running statistics of one input group."""

    def __init__(self, weights: tuple[str, ...], width: int):
        self.weights, self.amax, self.amax_decode, self.tokens = weights, 0.0, 0.0, 0
        self.channel_max = torch.zeros(width)
        self.hist = torch.zeros(HIST_BINS, dtype=torch.int64)
        self.hist_max = 0.0

    def add(self, x: torch.Tensor, decode: bool) -> None:
        if x.numel() == 0:
            return
        a = x.detach().float().abs().reshape(-1, x.shape[-1])  # [tokens, in]
        self.channel_max = torch.maximum(self.channel_max, a.amax(0))
        m = float(a.max()) if a.numel() else 0.0
        if not math.isfinite(m):
            raise DeployError(f"non-finite activations reach {self.weights[0]}: the weights or the data overflow fp32")
        self.amax = max(self.amax, m)
        if decode:
            self.amax_decode = max(self.amax_decode, m)
        self.tokens += a.shape[0]
        if m >= self.hist_max and m > 0:
            self._grow(math.ldexp(1.0, math.frexp(m)[1]))  # smallest power of two above m
        scale = HIST_BINS / self.hist_max if self.hist_max else 0.0  # a power of two: indices are exact
        flat = a.reshape(-1)
        for lo in range(0, flat.numel(), HIST_CHUNK):
            idx = (flat[lo:lo + HIST_CHUNK] * scale).to(torch.int64).clamp_(max=HIST_BINS - 1)
            self.hist += torch.bincount(idx, minlength=HIST_BINS)

    def _grow(self, new_max: float) -> None:
        if self.hist_max:
            for _ in range(round(math.log2(new_max / self.hist_max))):  # each doubling merges bin pairs
                self.hist = torch.cat([self.hist.view(-1, 2).sum(1), torch.zeros(HIST_BINS // 2, dtype=torch.int64)])
        self.hist_max = new_max

    def result(self) -> GroupStats:
        return GroupStats(self.weights, self.amax, self.amax_decode, self.channel_max.numpy().astype(np.float32),
                          self.hist.numpy().copy(), self.hist_max, self.tokens)


class _Capture(TorchFunctionMode):
    """Feeds the left operand of `x @ W` to W's accumulator, for the tracked weight tensors W."""

    def __init__(self, tracked: dict[int, tuple[torch.Tensor, _Accumulator]]):
        super().__init__()
        self.tracked, self.decode = tracked, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if len(args) == 2 and "matmul" in getattr(func, "__name__", ""):
            hit = self.tracked.get(id(args[1]))
            if hit is not None and hit[0] is args[1]:
                hit[1].add(args[0], self.decode)
        return func(*args, **(kwargs or {}))


@dataclasses.dataclass
class ActivationStats:
    groups: dict[str, GroupStats]
    weights: dict[str, WeightStats]
    model_identity: str
    data_sha256: str
    seq_len: int
    decode_steps: int
    num_sequences: int
    info: dict  # descriptions of the model and data; not checked
    kv_amax: dict[str, float] = dataclasses.field(default_factory=dict)  # layers.<i>.key/.value -> max |k| / |v|

    def group_of(self, weight: str) -> GroupStats:
        """The input statistics of the group a weight target (e.g. layers.3.attn.wk) belongs to."""
        for g in self.groups.values():
            if weight in g.weights:
                return g
        raise KeyError(weight)

    def input_amax(self, method: str = "amax", *, percentile: float = DEFAULT_PERCENTILE) -> dict[str, float]:
        """Weight target -> the clip of the input it reads ("amax", "percentile" or "mse"): qdq's input_amax."""
        clip = {"amax": lambda g: g.amax, "percentile": lambda g: g.percentile(percentile),
                "mse": lambda g: g.mse_clip()}.get(method)
        if clip is None:
            raise DeployError(f"unknown clip method {method!r}: use amax, percentile or mse")
        return {w: clip(g) for g in self.groups.values() for w in g.weights}

    def save(self, path: str | Path) -> Path:
        """One .npz (arrays + JSON metadata), written to a temporary sibling and renamed into place."""
        path = Path(path)
        arrays, groups, weights = {}, [], []
        for k, (name, g) in enumerate(self.groups.items()):
            arrays[f"g{k}_channel_max"], arrays[f"g{k}_hist"] = g.channel_max, g.hist
            groups.append({"name": name, "weights": list(g.weights), "amax": g.amax, "amax_decode": g.amax_decode,
                           "hist_max": g.hist_max, "tokens": g.tokens, "width": int(g.channel_max.shape[0])})
        for k, (name, w) in enumerate(self.weights.items()):
            arrays[f"w{k}_out_max"], arrays[f"w{k}_in_max"] = w.out_max, w.in_max
            weights.append({"name": name, "out": int(w.out_max.shape[0]), "in": int(w.in_max.shape[0])})
        meta = {"format": FORMAT, "version": VERSION, "hist_bins": HIST_BINS, "model_identity": self.model_identity,
                "data_sha256": self.data_sha256, "seq_len": self.seq_len, "decode_steps": self.decode_steps,
                "num_sequences": self.num_sequences, "info": self.info, "groups": groups, "weights": weights,
                "kv_amax": self.kv_amax}
        arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise DeployError(f"cannot write the calibration cache {path}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp's file is private; the cache is an ordinary output
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise DeployError(f"cannot write the calibration cache {path}: {e.strerror}") from None
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, *, expect_model: WeightSource | str | None,
             expect_data: CalibrationSet | str | None, expect_decode_steps: int | None = None) -> ActivationStats:
        """Read a cache (never unpickling); refused unless made for `expect_model` (a source or its
        model_identity) on `expect_data` (a CalibrationSet or its sha256). None skips that check."""
        path = Path(path)
        if not path.is_file():
            raise DeployError(f"calibration cache not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta_json"]).decode())
                if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                    raise DeployError(f"{path} is not a version-{VERSION} calibration cache (format "
                                      f"{meta.get('format')!r}, version {meta.get('version')!r})")
                want = model_identity(expect_model) if hasattr(expect_model, "config") else expect_model
                if want is not None and meta["model_identity"] != want:
                    raise DeployError(f"calibration cache {path} was made for another model "
                                      f"({meta['info'].get('model', '?')}); recompute it for this one")
                want = expect_data.sha256 if isinstance(expect_data, CalibrationSet) else expect_data
                if want is not None and meta["data_sha256"] != want:
                    raise DeployError(f"calibration cache {path} was made from other calibration data "
                                      f"({meta['info'].get('data', '?')}); recompute it for this data")
                if expect_decode_steps is not None and meta["decode_steps"] != expect_decode_steps:
                    raise DeployError(f"calibration cache {path} has {meta['decode_steps']} decode steps, "
                                      f"not {expect_decode_steps}")
                groups = {g["name"]: GroupStats(tuple(g["weights"]), float(g["amax"]), float(g["amax_decode"]),
                                                _array(z, f"g{k}_channel_max", np.float32, (g["width"],)),
                                                _array(z, f"g{k}_hist", np.int64, (HIST_BINS,)),
                                                float(g["hist_max"]), int(g["tokens"]))
                          for k, g in enumerate(meta["groups"])}
                weights = {w["name"]: WeightStats(_array(z, f"w{k}_out_max", np.float32, (w["out"],)),
                                                  _array(z, f"w{k}_in_max", np.float32, (w["in"],)))
                           for k, w in enumerate(meta["weights"])}
        except DeployError:
            raise
        except Exception as e:  # not a zip, a missing member, malformed JSON: all mean a foreign or corrupt file
            raise DeployError(f"cannot read calibration cache {path} (corrupt or not a cache?): {e}") from None
        return cls(groups, weights, meta["model_identity"], meta["data_sha256"], int(meta["seq_len"]),
                   int(meta["decode_steps"]), int(meta["num_sequences"]), meta["info"],
                   {str(k): float(v) for k, v in meta["kv_amax"].items()})


def _array(z, key: str, dtype, shape) -> np.ndarray:
    a = z[key]
    if a.dtype != dtype or a.shape != tuple(shape):
        raise ValueError(f"array {key} is {a.dtype}{list(a.shape)}, expected {np.dtype(dtype)}{list(shape)}")
    return a


def model_identity(source: WeightSource) -> str:
    """sha256 of the config and a fingerprint of some weights: the first embedding rows, the final norm, each
    layer's first q_proj row and the head's first rows (cheap to read, and any retraining changes them)."""
    c = source.config
    h = hashlib.sha256(json.dumps(dataclasses.asdict(c), sort_keys=True, default=str).encode())
    names = [("model.embed_tokens.weight", 8), ("model.norm.weight", None)]
    names += [(f"model.layers.{i}.self_attn.q_proj.weight", 1) for i in range(c.num_hidden_layers)]
    names += [] if c.tie_word_embeddings else [("lm_head.weight", 8)]
    for name, rows in names:
        t = source.get(name) if rows is None else source.get_rows(name, 0, rows)
        h.update(name.encode() + b"\0" + t.float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _stream_rows(source: WeightSource, name: str, rows: int):
    """(first row, fp32 rows [r, cols]) chunks of a 2-D source tensor, refusing non-finite values."""
    for lo in range(0, rows, ROW_CHUNK):
        part = source.get_rows(name, lo, min(lo + ROW_CHUNK, rows)).float()
        if not bool(torch.isfinite(part).all()):
            raise DeployError(f"tensor {name} has non-finite values (NaN or Inf) near row {lo}")
        yield lo, part


def _embed(source: WeightSource, config: LlamaConfig, ids: torch.Tensor) -> torch.Tensor:
    """[N, L] ids -> [N, L, E] fp32, reading only the row chunks that hold used ids."""
    flat = ids.reshape(-1)
    out = torch.empty(flat.numel(), config.hidden_size)
    for lo in sorted({int(t) // ROW_CHUNK * ROW_CHUNK for t in flat.unique()}):
        part = source.get_rows("model.embed_tokens.weight", lo, min(lo + ROW_CHUNK, config.vocab_size)).float()
        sel = (flat >= lo) & (flat < lo + part.shape[0])
        out[sel] = part[flat[sel] - lo]
    return out.view(*ids.shape, config.hidden_size)


def _weight_stats(w: torch.Tensor) -> WeightStats:
    a = w.detach().abs()  # [in, out]
    return WeightStats(a.amax(0).numpy().astype(np.float32), a.amax(1).numpy().astype(np.float32))


@torch.no_grad()
def collect_statistics(source: WeightSource, calib: CalibrationSet, *, decode_steps: int = 16, batch: int = 4,
                       progress: bool = False) -> ActivationStats:
    """Activation statistics of every quantized MatMul input over `calib` (prefill + decode), and weight
    channel maxima; see the module doc for what is computed and how memory is bounded."""
    from tqdm import tqdm

    config = source.config
    n, seq = len(calib.sequences), calib.seq_len
    if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or not 0 <= decode_steps < seq:
        raise DeployError(f"decode_steps must be an integer from 0 to seq_len - 1 = {seq - 1} (got {decode_steps!r})")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise DeployError(f"batch must be a positive integer (got {batch!r})")
    if seq > config.max_position_embeddings:
        raise DeployError(f"calibration seq_len {seq} is over the model's context of {config.max_position_embeddings}")
    ids = torch.from_numpy(calib.as_array())  # [N, L]
    if int(ids.max()) >= config.vocab_size or int(ids.min()) < 0:
        raise DeployError(f"calibration ids reach {int(ids.max())}, outside the vocabulary of {config.vocab_size}")
    prefill = seq - decode_steps
    x = _embed(source, config, ids)  # [N, L, E]: every token's hidden state, carried from block to block
    cos, sin = rope_cos_sin(derived_tensors(config)["rope_inv_freq"], torch.arange(seq)[None])  # [1, 1, L, D]
    prefill_mask = additive_mask(torch.ones(1, prefill), 0, prefill)  # [1, 1, P, P], broadcast over the batch
    decode_batch = max(batch, DECODE_BATCH)
    table = {e.target: e for e in name_table(config)}
    groups, weights, kv_amax = {}, {}, {}
    group_names = linear_groups(config)
    for i in tqdm(range(config.num_hidden_layers), desc="calibration statistics", unit="layer", disable=not progress):
        with torch.device("meta"):
            block = Block(config)
        block.load_state_dict({k: target_tensor(source, table[f"layers.{i}.{k}"], torch.float32)
                               for k, _ in block.named_parameters()}, assign=True)
        params = dict(block.named_parameters())
        acc = {}
        for weight, group in LINEAR_INPUTS.items():
            weights[f"layers.{i}.{weight}"] = _weight_stats(params[weight])
            if group not in acc:  # the group's first weight stands for its shared input
                acc[group] = (params[weight], _Accumulator(group_names[f"layers.{i}.{group}"],
                                                           params[weight].shape[0]))
        capture = _Capture({id(p): (p, a) for p, a in acc.values()})
        with capture:
            for g0 in range(0, n, decode_batch):
                xg = x[g0:g0 + decode_batch]  # [G, L, E], a view: outputs are written back in place
                ks, vs = [], []
                capture.decode = False
                for b0 in range(0, xg.shape[0], batch):  # prefill: its [b, H, S, S] scores bound the batch
                    xb = xg[b0:b0 + batch, :prefill]     # [b, P, E]
                    out, k, v = block(xb, cos[:, :, :prefill], sin[:, :, :prefill], prefill_mask,
                                      *[torch.zeros(xb.shape[0], config.num_key_value_heads, 0, config.head_dim)] * 2)
                    xb.copy_(out)  # decode steps read only positions >= prefill
                    ks, vs = ks + [k], vs + [v]
                k, v = torch.cat(ks), torch.cat(vs)  # [G, K, P, D]
                ks, vs = [], []
                capture.decode = True
                outs = []
                for t in range(prefill, seq):  # one token against the populated past, as decoding runs
                    out, k, v = block(xg[:, t:t + 1], cos[:, :, t:t + 1], sin[:, :, t:t + 1],
                                      additive_mask(torch.ones(1, t + 1), t, 1), k, v)
                    outs.append(out)
                if outs:
                    xg[:, prefill:].copy_(torch.cat(outs, dim=1))
                for kind, t in (("key", k), ("value", v)):  # [G, K, L, D]: every position's cached entry
                    name = f"layers.{i}.{kind}"
                    kv_amax[name] = max(kv_amax.get(name, 0.0), float(t.abs().max()))
                del k, v, outs
        for group, (_, a) in acc.items():
            groups[f"layers.{i}.{group}"] = a.result()
        del block, params, acc, capture
    if not config.tie_word_embeddings:
        with torch.device("meta"):
            norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        norm.load_state_dict({"weight": target_tensor(source, table["norm.weight"], torch.float32)}, assign=True)
        head = _Accumulator((HEAD,), config.hidden_size)
        for b0 in range(0, n, batch):
            head.add(norm(x[b0:b0 + batch, :prefill]), decode=False)
            head.add(norm(x[b0:b0 + batch, prefill:]), decode=True)
        groups[HEAD] = head.result()
        out_max, in_max = torch.empty(config.vocab_size), torch.zeros(config.hidden_size)
        for lo, part in _stream_rows(source, table[HEAD].source, config.vocab_size):  # HF rows: output channels
            out_max[lo:lo + part.shape[0]] = part.abs().amax(1)
            in_max = torch.maximum(in_max, part.abs().amax(0))
        weights[HEAD] = WeightStats(out_max.numpy(), in_max.numpy())
    info = {"model": source.description, "data": calib.description, "data_source": calib.source,
            "prefill_tokens": prefill, "hist_bins": HIST_BINS}
    return ActivationStats({g: groups[g] for g in group_names}, weights, model_identity(source), calib.sha256,
                           seq, decode_steps, n, info, kv_amax)
