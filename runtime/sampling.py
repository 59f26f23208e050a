"""Sampling parameters (validated) and a numpy sampler over last-position logits, one row at a time."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

import numpy as np

from llama3_deploy.errors import DeployError

from .tokenizer import check_unicode

MAX_STOP_STRINGS = 16    # stop strings per request: each one is searched for after every token
MAX_STOP_CHARS = 256     # characters per stop string
SEED_LIMIT = 1 << 64     # seeds are integers in [0, 2**64); None draws a fresh random seed
MAX_STOP_TOKEN_IDS = 64  # extra stop ids per request
MAX_LOGPROBS = 20        # top alternatives per token (OpenAI's own cap)
PENALTY_RANGE = 2.0      # presence/frequency penalties in [-2, 2], as OpenAI's API


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.

    Integers must be real integers (bool is refused: `top_k=True` is a mistake, not 1); `seed=None`
    draws a random seed, other seeds are integers in [0, 2**64); `stop` is a list or tuple of at most
    MAX_STOP_STRINGS non-empty strings of at most MAX_STOP_CHARS characters each.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks force the token count
    presence_penalty: float = 0.0   # OpenAI's: subtracted once from each id generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence among the generated ids
    stop_token_ids: tuple[int, ...] = ()  # ids that end the request like EOS (not reported as text)
    logprobs: int | None = None     # None: none; k: the sampled id's logprob and the k most likely ids' (0..20)

    def __post_init__(self) -> None:
        problems = []
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r})")
        if not _finite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature!r}); 0 means greedy")
        if not _is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r}); 0 disables it")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty!r})")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            problems.append(f"seed must be an integer in [0, 2**64), or None for a random seed (got {self.seed!r})")
        problems += _stop_problems(self.stop)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not -PENALTY_RANGE <= v <= PENALTY_RANGE:
                problems.append(f"{name} must be in [-2, 2] (got {v!r})")
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or len(ids) > MAX_STOP_TOKEN_IDS \
                or not all(_is_int(i) and 0 <= i < SEED_LIMIT for i in ids):
            problems.append(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids >= 0 "
                            f"(got {ids!r:.60})")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            problems.append(f"logprobs must be None or an integer from 0 to {MAX_LOGPROBS} (got {self.logprobs!r})")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            problems.append(f"ignore_eos must be True or False (got {self.ignore_eos!r})")
        if problems:
            raise DeployError("invalid sampling parameters: " + "; ".join(problems))
        # Normal forms (numpy scalars -> Python numbers, a list of stops -> tuple) keep the dataclass hashable.
        for name, kind in (("max_new_tokens", int), ("top_k", int), ("seed", int), ("temperature", float),
                           ("top_p", float), ("repetition_penalty", float), ("presence_penalty", float),
                           ("frequency_penalty", float), ("logprobs", int)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the raw logits: what an --argmax graph's greedy ids are (no penalty, no logprobs)."""
        return (self.greedy and self.repetition_penalty == 1.0 and self.presence_penalty == 0
                and self.frequency_penalty == 0 and self.logprobs is None)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) and math.isfinite(x)


def _stop_problems(stop: Any) -> list[str]:
    if not isinstance(stop, (list, tuple)):
        return [f"stop must be a list or tuple of strings, not {type(stop).__name__} "
                "(wrap a single stop string in a list)"]
    if len(stop) > MAX_STOP_STRINGS:
        return [f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed"]
    for k, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            return [f"stop[{k}] must be a non-empty string (got {s!r:.40})"]
        if len(s) > MAX_STOP_CHARS:
            return [f"stop[{k}] has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed"]
        try:
            check_unicode(s, f"stop[{k}]")
        except DeployError as e:
            return [str(e)]
    return []


class Sampler:
    """Picks one token per row from last-position logits [B, V] (fp32, host memory).

    Each row has its own seeded generator, so a row's tokens do not depend on the batch it ran in.
    Work per step is O(vocabulary), independent of the context length: the repetition penalty keeps
    a per-row mask of seen ids instead of rescanning the context.

    The arithmetic is in float64 and never divides an unshifted logit by the temperature: logits are
    shifted so the best is 0 first, so a denormal temperature (1e-320) or an extreme penalty gives
    -inf for the others (greedy in the limit) instead of inf - inf = NaN. Infinite logits share the
    probability; NaN logits are never picked.
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
        # OpenAI's presence/frequency penalties count generated ids only (the prompt is not penalised).
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = np.zeros((rows, vocab_size), dtype=np.int32)

    def __call__(self, logits: np.ndarray, row: int) -> int:
        p = self.params
        x = logits
        if self.seen is not None:
            seen = self.seen[row]
            x = logits.astype(np.float64)  # a tiny or huge penalty then overflows to +-inf, never raises
            with np.errstate(over="ignore", under="ignore"):
                v = x[seen]
                x[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if self.counts is not None:
            c = self.counts[row]
            x = x.astype(np.float64)  # a copy either way: the caller's logits stay as they are
            with np.errstate(over="ignore", invalid="ignore"):
                x -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
        token = int(np.argmax(x))
        best = x[token]
        if np.isnan(best) or best == -np.inf:  # a NaN wins argmax: drop NaNs, then something finite must remain
            x = np.where(np.isnan(x), -np.inf, x)
            token = int(np.argmax(x))
            best = x[token]
            if best == -np.inf:
                raise DeployError("the model produced no usable logits (all are NaN or -inf)")
        if not p.greedy:
            token = self._sample(x, float(best), self.rngs[row])
        if self.seen is not None:
            self.seen[row, token] = True
        if self.counts is not None:
            self.counts[row, token] += 1
        return token

    def _sample(self, x: np.ndarray, best: float, rng: np.random.Generator) -> int:
        p = self.params
        if best == np.inf:  # infinitely likely tokens take all the probability, evenly
            scaled = np.where(x == np.inf, 0.0, -np.inf)
        else:
            with np.errstate(over="ignore", under="ignore"):
                scaled = (x.astype(np.float64, copy=False) - best) / p.temperature  # <= 0, the best exactly 0
        k = p.top_k if 0 < p.top_k < scaled.size else scaled.size
        cand = np.argpartition(-scaled, k - 1)[:k] if k < scaled.size else np.arange(scaled.size)
        cand = cand[np.argsort(-scaled[cand], kind="stable")]  # candidates, most likely first
        probs = np.exp(scaled[cand])  # the first is exp(0) = 1, so the sum is >= 1
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            cand, probs = cand[:keep], probs[:keep] / probs[:keep].sum()
        return int(cand[rng.choice(cand.size, p=probs)])


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log-softmax of raw last-position logits [V] (the model's distribution, before penalties and temperature):
    the logprob of `token` and the k most likely (id, logprob) pairs, most likely first."""
    x = logits.astype(np.float64)
    x = np.where(np.isnan(x), -np.inf, x)
    top = float(x.max())
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        lse = top + np.log(np.exp(x - top).sum()) if np.isfinite(top) else top
        lp = x - lse
    best = np.argpartition(-lp, k - 1)[:k] if 0 < k < lp.size else np.arange(lp.size if k else 0)
    best = best[np.argsort(-lp[best], kind="stable")]
    return float(lp[token]), [(int(i), float(lp[i])) for i in best]
