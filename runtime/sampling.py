"""Sampling parameters (validated) and a numpy sampler over last-position logits, one row at a time."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from llama3_deploy.errors import DeployError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks force the token count

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r})")
        if not _finite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature!r}); 0 means greedy")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r}); 0 disables it")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty!r})")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop must be a sequence of non-empty strings")
        if problems:
            raise DeployError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Sampler:
    """Picks one token per row from last-position logits [B, V] (fp32, host memory).

    Each row has its own seeded generator, so a row's tokens do not depend on the batch it ran in.
    Work per step is O(vocabulary), independent of the context length: the repetition penalty keeps
    a per-row mask of seen ids instead of rescanning the context.
    """

    def __init__(self, params: SamplingParams, rows: int, vocab_size: int, *,
                 prompts: Sequence[Sequence[int]] = ()):
        self.params = params
        base = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % (1 << 63))
        self.rngs = [np.random.default_rng([base, row]) for row in range(rows)]
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = np.zeros((rows, vocab_size), dtype=bool)
            for row, ids in enumerate(prompts):
                self.seen[row, np.asarray(ids, dtype=np.int64)] = True

    def __call__(self, logits: np.ndarray, row: int) -> int:
        p = self.params
        if self.seen is not None:
            seen = self.seen[row]
            logits = np.where(seen, np.where(logits > 0, logits / p.repetition_penalty,
                                             logits * p.repetition_penalty), logits)
        token = int(np.argmax(logits)) if p.greedy else self._sample(logits, self.rngs[row])
        if self.seen is not None:
            self.seen[row, token] = True
        return token

    def _sample(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        p = self.params
        scaled = logits.astype(np.float64) / p.temperature
        k = p.top_k if 0 < p.top_k < scaled.size else scaled.size
        cand = np.argpartition(-scaled, k - 1)[:k] if k < scaled.size else np.arange(scaled.size)
        cand = cand[np.argsort(-scaled[cand], kind="stable")]  # candidates, most likely first
        probs = np.exp(scaled[cand] - scaled[cand[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            cand, probs = cand[:keep], probs[:keep] / probs[:keep].sum()
        return int(cand[rng.choice(cand.size, p=probs)])
