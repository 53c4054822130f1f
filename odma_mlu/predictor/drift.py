"""Drift detection for the online length histogram: re-optimize early when traffic shifts.

Why: ``OnlineLengthHistogram`` re-optimizes every ``reoptimize_every`` requests over a
window of ``window`` (default 2000) lengths. After a workload switch the window stays
dominated by the old traffic for up to ``window`` requests, so the bucket boundaries fit the
wrong distribution for that long. ``KSDriftDetector`` (the hook ``OdmaPolicy`` takes as
``drift_detector``; ``DriftAwareHistogram`` bundles it with a histogram) compares the last ``recent``
lengths with the rest of the window every ``check_every`` requests using the two-sample
Kolmogorov-Smirnov statistic; above the critical value at ``alpha`` it

1. estimates where the change happened (the suffix of the recent lengths, in steps of
   ``check_every``, that differs most from the older lengths: a suffix of pure new traffic
   has the largest statistic, mixed ones are diluted),
2. drops everything before it and re-optimizes at once, then
3. re-optimizes every ``check_every`` requests until the window holds ``recent`` lengths
   again (boundaries from 50 lengths are rough; they sharpen as lengths arrive).

Bound (tested in tests/test_predictor_drift.py, stated in docs/predictor.md): with the
defaults (recent 200, check_every 50, alpha 0.001) a shift whose KS distance is >= 0.5 is
detected within 100 requests of the switch, and from then on the boundaries' expected waste
on the new distribution stays within 15% of the optimum for it; without detection the plain
histogram is still > 1.3x the optimum 1000 requests after the switch (it needs ~``window``).
"""

from __future__ import annotations

import math

import numpy as np

from odma_mlu.predictor.histogram import BucketBoundaries, OnlineLengthHistogram


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance sup |F_a - F_b|."""
    if a.size == 0 or b.size == 0:
        return 0.0
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


def ks_critical(n: int, m: int, alpha: float) -> float:
    """Asymptotic two-sample KS critical value c(alpha) * sqrt((n + m) / (n m))."""
    c = math.sqrt(-0.5 * math.log(alpha / 2.0))
    return c * math.sqrt((n + m) / (n * m))


class KSDriftDetector:
    """The detector alone, for a policy that owns its histogram (``OdmaPolicy(drift_detector=)``):
    call ``observe(tokens, histogram)`` after ``histogram.observe(tokens)``; on True the
    caller re-optimizes. On a detected drift it has already cut the histogram's window to
    the post-change lengths."""

    def __init__(self, recent: int = 200, check_every: int = 50, alpha: float = 1e-3) -> None:
        assert 1 <= check_every <= recent, "need 1 <= check_every <= recent"
        self.recent = recent
        self.check_every = check_every
        self.alpha = alpha
        self._since_check = 0
        self._refilling = False
        self.num_drifts = 0
        self.last_statistic = 0.0

    def observe(self, tokens: int, histogram: OnlineLengthHistogram) -> bool:
        """True when the caller should re-optimize now (drift, or refilling after one)."""
        self._since_check += 1
        if self._since_check < self.check_every:
            return False
        self._since_check = 0
        if self._refilling:
            self._refilling = len(histogram) < self.recent
            return True
        if len(histogram) < self.recent + self.check_every:
            return False
        lengths = histogram.lengths()
        old, new = lengths[:-self.recent], lengths[-self.recent:]
        self.last_statistic = ks_statistic(old, new)
        if self.last_statistic <= ks_critical(old.size, new.size, self.alpha):
            return False
        # Change point: the suffix (multiple of check_every) most unlike the old lengths.
        best_len, best_d = self.check_every, -1.0
        for n in range(self.check_every, self.recent + 1, self.check_every):
            d = ks_statistic(old, lengths[-n:])
            if d > best_d + 1e-12:
                best_len, best_d = n, d
        histogram.keep_only(lengths[-best_len:].astype(int).tolist())
        self.num_drifts += 1
        self._refilling = best_len < self.recent
        return True


class DriftAwareHistogram(OnlineLengthHistogram):
    """``OnlineLengthHistogram`` plus a ``KSDriftDetector`` (drop-in for the odma policy)."""

    def __init__(self, max_tokens: int, num_buckets: int, window: int = 2000, reoptimize_every: int = 200,
                 bin_tokens: int = 16, initial: BucketBoundaries | None = None, recent: int = 200,
                 check_every: int = 50, alpha: float = 1e-3) -> None:
        super().__init__(max_tokens, num_buckets, window, reoptimize_every, bin_tokens, initial)
        assert recent < window, "the recent window must be shorter than the histogram window"
        self.detector = KSDriftDetector(recent, check_every, alpha)

    @property
    def num_drifts(self) -> int:
        return self.detector.num_drifts

    def observe(self, tokens: int) -> bool:
        """Record a completed length; True if boundaries were re-optimized (periodic or drift)."""
        reopt = super().observe(tokens)
        if self.detector.observe(tokens, self):
            self.reoptimize()
            return True
        return reopt
