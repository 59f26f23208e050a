"""Accuracy gates: a quantized export against its fp32 twin on held-out text; a bad build fails with the figures.

Scores are teacher-forced through this project's runtime (`Generator.prompt_logits`, exports with logits at
every position): perplexity of each graph, and per position the KL divergence of the quantized next-token
distribution from fp32's and whether their top-1 tokens agree.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from llama3_deploy.errors import DeployError, ValidationError


@dataclasses.dataclass(frozen=True)
class GateThresholds:
    """When a quantized build fails. Defaults for 8-bit weights and activations (W8A8 INT8, FP8): published
    W8A8 SmoothQuant moves Llama-3-8B's WikiText-2 perplexity by +2% and FP8 keeps ~99.3% of the Instruct
    model's benchmark average, so +5% perplexity and 0.05 nats of mean KL leave room for a smaller model's
    larger relative error while any broken range (clipping the activations) lands far beyond both."""

    max_ppl_increase: float = 0.05  # (quantized perplexity / fp32 perplexity) - 1
    max_kl: float = 0.05            # mean KL(fp32 || quantized) per position, nats

    def __post_init__(self) -> None:
        for name in ("max_ppl_increase", "max_kl"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise DeployError(f"accuracy gate {name} must be a finite number >= 0 (got {v!r})")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(generator, windows: list[list[int]], *, ref_logprobs: list[np.ndarray] | None = None
          ) -> tuple[dict, list[np.ndarray]]:
    """Teacher-forced NLL and perplexity of `windows` under one export's Generator; with `ref_logprobs` (the
    fp32 run's second return value) also KL and top-1 agreement against it. Returns (figures, logprobs)."""
    nll = kl = 0.0
    n = top1 = 0
    logprobs: list[np.ndarray] = []
    for i, w in enumerate(windows):
        lp = log_softmax(generator.prompt_logits(w)[:-1])  # [T-1, V]: position t predicts token t+1
        target = np.asarray(w[1:])
        nll -= lp[np.arange(len(target)), target].sum()
        n += len(target)
        if ref_logprobs is None:
            logprobs.append(lp.astype(np.float32))
        else:
            p = ref_logprobs[i].astype(np.float64)
            kl += (np.exp(p) * (p - lp)).sum()
            top1 += int((p.argmax(-1) == lp.argmax(-1)).sum())
    figures = {"nll": nll / n, "perplexity": math.exp(nll / n), "scored_tokens": n}
    if ref_logprobs is not None:
        figures.update(kl_vs_fp32=kl / n, top1_vs_fp32=top1 / n)
    return figures, logprobs


def compare(fp32_dir: str | Path, quantized_dir: str | Path, windows: list[list[int]], *, threads: int = 0) -> dict:
    """The gate's figures for a quantized export against its fp32 twin on the same held-out windows."""
    from llama3_deploy.runtime.generate import Generator

    ref, ref_lp = score(Generator(fp32_dir, threads=threads), windows)
    got, _ = score(Generator(quantized_dir, threads=threads), windows, ref_logprobs=ref_lp)
    return {"fp32_perplexity": ref["perplexity"], "perplexity": got["perplexity"],
            "ppl_change": got["perplexity"] / ref["perplexity"] - 1, "kl_vs_fp32": got["kl_vs_fp32"],
            "top1_vs_fp32": got["top1_vs_fp32"], "scored_tokens": got["scored_tokens"], "windows": len(windows)}


def check(figures: dict, thresholds: GateThresholds) -> dict:
    """Raise ValidationError naming every exceeded threshold with its figure; else the gate's record."""
    failed = []
    if not figures["ppl_change"] <= thresholds.max_ppl_increase:  # NaN fails too
        failed.append(f"perplexity {figures['perplexity']:.4g} is {100 * figures['ppl_change']:+.2f}% vs fp32 "
                      f"{figures['fp32_perplexity']:.4g} (limit +{100 * thresholds.max_ppl_increase:g}%)")
    if not figures["kl_vs_fp32"] <= thresholds.max_kl:
        failed.append(f"mean KL vs fp32 {figures['kl_vs_fp32']:.4g} nats (limit {thresholds.max_kl:g})")
    record = {**figures, "thresholds": dataclasses.asdict(thresholds), "passed": not failed}
    if failed:
        raise ValidationError("accuracy gate failed: " + "; ".join(failed)
                              + f" (top-1 agreement {100 * figures['top1_vs_fp32']:.1f}%, "
                              f"{figures['scored_tokens']} tokens scored)")
    return record
