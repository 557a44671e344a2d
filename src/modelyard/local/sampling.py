"""One logits row + a choice's params -> the next token, its logprob and the top alternatives.

Each choice owns a Sampler with its own seeded generator, so its draws depend on nothing but
its seed and its own logits: the same request gives the same tokens alone or under any load.
Logprobs are those of the model's raw distribution (before temperature, penalties and top_p),
as vLLM and OpenAI report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.types import SamplingParams


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float | None = None                        # set when logprobs were asked for
    # (token, logprob): the k best, best first, then the sampled token if it is not among them
    # (OpenAI's and vLLM's legacy contract: up to k + 1 entries, the sampled one always there)
    top: tuple[tuple[int, float], ...] | None = None


def log_softmax_at(row: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log p(ids) under softmax(row), without materialising the whole distribution."""
    m = float(row.max())
    lse = m + float(np.log(np.exp(row - m, dtype=np.float64).sum()))
    return row[ids].astype(np.float64) - lse


def top_k(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries, largest first (ties: lower index first)."""
    part = np.argpartition(-row, k - 1)[:k]
    # argpartition keeps an arbitrary one of the values tied at the cut: take the lowest ids.
    cut = row[part].min()
    above = np.flatnonzero(row > cut)
    ids = np.concatenate([above, np.flatnonzero(row == cut)[: k - len(above)]])
    return ids[np.lexsort((ids, -row[ids]))]


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        # seed None: fresh entropy, so unseeded requests differ from each other.
        # PCG64 takes seeds in [0, 2**64); the API allows negative ones, and seed + i may overflow.
        seed = None if params.seed is None else params.seed % 2**64
        self._rng = None if params.greedy else np.random.Generator(np.random.PCG64(seed))
        self._counts: dict[int, int] = {}
        self._bias = (np.fromiter(params.logit_bias.keys(), np.int64),
                      np.fromiter(params.logit_bias.values(), np.float32)) if params.logit_bias else None
        # 1/temperature is capped at float32's largest: past it (a temperature under ~3e-39, which
        # the API allows) the maximum's 0 x inf was NaN. Capped, the draw is the limit the tiny
        # temperature means: the maximum, ties at it drawn from; unchanged otherwise.
        self._scale = None if params.greedy else np.float32(
            min(1.0 / params.temperature, float(np.finfo(np.float32).max)))

    @property
    def _adjusts(self) -> bool:
        p = self.params
        return bool(self._bias is not None or (self._counts and (p.presence_penalty or p.frequency_penalty)))

    def sample(self, row: np.ndarray) -> Sample:
        x = self._adjusted(row) if self._adjusts else row
        token = int(np.argmax(x)) if self._rng is None else self._draw(x)
        self._counts[token] = self._counts.get(token, 0) + 1
        k = self.params.logprobs
        if k is None:
            return Sample(token)
        ids = top_k(row, k) if k > 0 else np.empty(0, np.int64)
        lps = log_softmax_at(row, np.append(ids, token))      # the raw row only: batch-invariant
        # A constrained row (local/grammar) holds -inf for what the grammar forbids: those are
        # not alternatives, and JSON has no -inf.
        top = tuple((t, lp) for t, lp in zip(ids.tolist(), lps[:-1].tolist()) if lp != -np.inf)
        if token not in ids:
            top += ((token, float(lps[-1])),)
        return Sample(token, float(lps[-1]), top)

    def _adjusted(self, row: np.ndarray) -> np.ndarray:
        x = row.astype(np.float32, copy=True)
        if self._bias is not None:
            x[self._bias[0]] += self._bias[1]
        p = self.params
        if self._counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self._counts.keys(), np.int64)
            counts = np.fromiter(self._counts.values(), np.float32)
            x[ids] -= p.frequency_penalty * counts + p.presence_penalty
        return x

    def _draw(self, x: np.ndarray) -> int:
        p = self.params
        if 0 < p.top_k < len(x):        # only the k most likely may be drawn (ties: the lower ids)
            keep = top_k(x, p.top_k)
            masked = np.full_like(x, -np.inf)
            masked[keep] = x[keep]
            x = masked
        # float32 exp of the whole row (gemma3: 262,144 entries) is ~0.3 ms; sums in float64.
        with np.errstate(over="ignore"):     # a product past float32 is -inf: probability 0, as meant
            probs = np.exp((x - x.max()) * self._scale, dtype=np.float32)
        ids = nucleus(probs, p.top_p) if p.top_p < 1.0 else None
        cum = np.cumsum(probs[ids] if ids is not None else probs, dtype=np.float64)
        i = min(int(np.searchsorted(cum, self._rng.random() * cum[-1], "right")), len(cum) - 1)
        return int(ids[i]) if ids is not None else i


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest set of most likely tokens whose mass reaches top_p of the whole, most
    likely first (ties: lower id first), as a stable sort of the whole row would order them.

    Sorting gemma3's 262,144-token row took ~20 ms a token on the engine thread. Only tokens
    with p >= (1 - top_p) / (2 V) of the total can be in the set: all the others together
    hold less than (1 - top_p) / 2 of the mass, so the cut falls before any of them. Those
    candidates (usually a few hundred) are all that is sorted.
    """
    total = float(probs.sum(dtype=np.float64))
    target = top_p * total
    floor = (1.0 - top_p) / (2 * len(probs)) * total
    cand = np.flatnonzero(probs >= floor)                 # ascending ids: the stable tie order
    ids = cand[np.argsort(-probs[cand], kind="stable")]
    cum = np.cumsum(probs[ids], dtype=np.float64)
    return ids[: min(int(np.searchsorted(cum, target)) + 1, len(ids))]
