"""Paired comparisons: two configurations scored on the same test sequences.

Every strategy of a study is scored on the same sampled test sequences of a domain
(``models/train/phases.py``: ``DomainData.test_sample``), so the honest test of "is A better than
B" resamples the *difference* per sequence (the same draws for both sides) instead of
comparing two intervals for overlap: what one sequence makes hard for A it makes hard for B
too, and pairing removes that shared variance (two unpaired 95% intervals can overlap while
the paired difference is far from 0).

:func:`paired_difference` takes each side as ``{domain: {seed: (n_sequences,) summed NLL}}``
and returns the mean over domains of the per-token NLL difference A - B with its percentile
bootstrap interval: sequences resampled with replacement within each domain (stratified; the
same indices for A and B and for every seed), and, where both sides ran the same two or more
seeds, those seeds resampled too (the same draw on every domain: a seed is one generic phase
shared by the domains). Where the sides do not share two seeds, each side's seeds are averaged
per sequence first and only sequences are resampled (said in ``seeds``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from slmfactory.platform.errors import DataError

BETTER, WORSE, TIE = "better", "worse", "tie"


@dataclass(frozen=True)
class PairedDifference:
    """NLL(A) - NLL(B) per token, averaged over domains, with its paired interval."""

    delta: float
    lo: float
    hi: float
    sequences: int
    """Test sequences paired, summed over the domains."""
    domains: int
    seeds: int
    """Seeds paired (resampled); 0 when the sides' seeds were averaged instead."""
    level: float
    replicates: int

    @property
    def verdict(self) -> str:
        """``better`` (A's NLL lower: the interval below 0), ``worse`` (above 0) or ``tie``."""
        if self.hi < 0:
            return BETTER
        if self.lo > 0:
            return WORSE
        return TIE

    @property
    def ratio(self) -> float:
        """Perplexity ratio A / B (exp of the NLL difference)."""
        return math.exp(self.delta)

    def text(self) -> str:
        """``ppl ratio 0.91 [0.89, 0.94], 1,536 seq.``: short, for tables."""
        seeds = f", {self.seeds} seeds paired" if self.seeds else ""
        return (f"ppl ratio {self.ratio:.3f} [{math.exp(self.lo):.3f}, {math.exp(self.hi):.3f}], "
                f"{self.sequences:,} seq.{seeds}")


def _as_matrix(side: Mapping[str, np.ndarray], seeds: list[str] | None, what: str) -> np.ndarray:
    """(n_seeds, n) for ``seeds``; (1, n), the seeds' mean, when ``seeds`` is None."""
    arrays = [np.asarray(side[s], dtype=np.float64) for s in (seeds if seeds is not None else sorted(side))]
    if not arrays:
        raise DataError(f"paired: {what} has no seeds")
    n = {len(a) for a in arrays}
    if len(n) != 1:
        raise DataError(f"paired: {what}'s seeds scored different numbers of test sequences ({sorted(n)})")
    m = np.stack(arrays)
    return m if seeds is not None else m.mean(0, keepdims=True)


def paired_difference(a: Mapping[str, Mapping[str, np.ndarray]], b: Mapping[str, Mapping[str, np.ndarray]],
                      tokens_per_seq: int, replicates: int = 2000, seed: int = 0,
                      level: float = 0.95) -> PairedDifference:
    """NLL(A) - NLL(B) per token on the same test sequences, mean over domains, with a paired
    percentile bootstrap interval at ``level`` (``replicates`` draws, seeded)."""
    if set(a) != set(b):
        raise DataError(f"paired: the sides cover different domains ({sorted(a)} vs {sorted(b)})")
    if not a:
        raise DataError("paired: no domains to compare")
    if tokens_per_seq < 1:
        raise DataError(f"paired: tokens_per_seq must be >= 1, got {tokens_per_seq}")
    domains = sorted(a)
    common = sorted(set.intersection(*(set(a[d]) & set(b[d]) for d in domains)))
    seeds = common if len(common) >= 2 else None
    diffs = []
    for d in domains:
        da, db = _as_matrix(a[d], seeds, f"A on {d}"), _as_matrix(b[d], seeds, f"B on {d}")
        if da.shape[1] != db.shape[1]:
            raise DataError(f"paired: {d}: A scored {da.shape[1]} test sequences, B {db.shape[1]}: not the same sample")
        if da.shape[1] == 0:
            raise DataError(f"paired: {d}: no test sequences")
        diffs.append((da - db) / tokens_per_seq)                                 # (S, n_d) per token
    rng = np.random.default_rng(seed)
    n_seeds = diffs[0].shape[0]
    seed_draw = rng.integers(0, n_seeds, size=(replicates, n_seeds)) if seeds else None  # (R, S)
    reps = np.zeros(replicates)
    for d in diffs:
        seq_draw = rng.integers(0, d.shape[1], size=(replicates, d.shape[1]))    # (R, n_d)
        per_seed = d[:, seq_draw].mean(-1)                                       # (S, R)
        if seed_draw is not None:
            reps += np.take_along_axis(per_seed.T, seed_draw, axis=1).mean(1)    # (R,)
        else:
            reps += per_seed[0]
    reps /= len(diffs)
    delta = float(np.mean([d.mean() for d in diffs]))
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [tail, 1.0 - tail])
    return PairedDifference(delta=delta, lo=float(lo), hi=float(hi), sequences=int(sum(d.shape[1] for d in diffs)),
                            domains=len(diffs), seeds=len(seeds) if seeds else 0, level=level, replicates=replicates)
