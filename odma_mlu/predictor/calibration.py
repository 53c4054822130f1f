"""Split-conformal calibration of predicted length quantiles, offline and online.

Why: a quantile head trained by pinball loss is only approximately calibrated (and badly
so on a shifted workload). Split conformal fixes the coverage with a finite-sample
guarantee: for a calibration set of n exchangeable requests with nonconformity score
``s_i = true_i / predicted_i`` (multiplicative, because length errors grow with length),
scaling the prediction by the ``ceil((n+1) q) / n`` empirical quantile of ``s`` gives
``P[true <= reserved] >= q`` on a new request from the same distribution (and <= q + 1/(n+1)).
Each quantile level is calibrated separately, and requests with and without prompt text get
separate factors (the no-text path is much less sharp).

Online: ``OnlineConformal`` keeps the scores of the last ``window`` completed requests and
re-fits the factors every ``refit_every`` observations, so coverage recovers after a drift.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def conformal_factor(scores: np.ndarray, level: float) -> float:
    """The finite-sample conformal quantile of ``scores`` at ``level`` (inf-safe)."""
    n = scores.size
    if n == 0:
        return 1.0
    k = min(n, int(math.ceil((n + 1) * level)))
    return float(np.partition(scores, k - 1)[k - 1])


@dataclass(frozen=True)
class Calibration:
    """Multiplicative factors per quantile level, for text and no-text requests."""

    levels: tuple[float, ...]
    factors_text: tuple[float, ...]
    factors_no_text: tuple[float, ...]
    num_samples: int
    target_coverage: float

    @classmethod
    def identity(cls, levels: Sequence[float], target_coverage: float) -> "Calibration":
        ones = tuple(1.0 for _ in levels)
        return cls(tuple(levels), ones, ones, 0, target_coverage)

    @classmethod
    def fit(cls, levels: Sequence[float], raw_text: np.ndarray, raw_no_text: np.ndarray | None, true_len: np.ndarray,
            target_coverage: float) -> "Calibration":
        """``raw_*``: (n, len(levels)) uncalibrated quantiles in length units; ``true_len``: (n,)."""
        y = np.maximum(np.asarray(true_len, dtype=np.float64), 1.0)

        def factors(raw: np.ndarray) -> tuple[float, ...]:
            s = y[:, None] / np.maximum(raw, 1.0)
            return tuple(conformal_factor(s[:, i], lv) for i, lv in enumerate(levels))

        ft = factors(raw_text)
        fn = factors(raw_no_text) if raw_no_text is not None else ft
        return cls(tuple(levels), ft, fn, int(y.size), target_coverage)

    def apply(self, raw: np.ndarray, has_text: bool) -> np.ndarray:
        f = np.asarray(self.factors_text if has_text else self.factors_no_text)
        return np.asarray(raw, dtype=np.float64) * f

    def to_dict(self) -> dict:
        return {"levels": list(self.levels), "factors_text": list(self.factors_text),
                "factors_no_text": list(self.factors_no_text), "num_samples": self.num_samples,
                "target_coverage": self.target_coverage, "score": "true / predicted (multiplicative)"}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(tuple(d["levels"]), tuple(d["factors_text"]), tuple(d["factors_no_text"]),
                   int(d["num_samples"]), float(d["target_coverage"]))


class OnlineConformal:
    """Re-fits a ``Calibration`` from completed requests (sliding window of scores)."""

    def __init__(self, initial: Calibration, window: int = 1000, refit_every: int = 200,
                 min_samples: int = 200) -> None:
        assert window >= min_samples >= 1 and refit_every >= 1, "window >= min_samples >= 1, refit_every >= 1"
        self.calibration = initial
        self.refit_every = refit_every
        self.min_samples = min_samples
        self._text: deque[np.ndarray] = deque(maxlen=window)
        self._no_text: deque[np.ndarray] = deque(maxlen=window)
        self._since = 0
        self.num_refits = 0

    def observe(self, raw_quantiles: np.ndarray, true_len: int, has_text: bool) -> bool:
        """Record one completed request's raw (uncalibrated) quantiles; True if re-fitted."""
        score = max(float(true_len), 1.0) / np.maximum(np.asarray(raw_quantiles, dtype=np.float64), 1.0)
        (self._text if has_text else self._no_text).append(score)
        self._since += 1
        if self._since < self.refit_every:
            return False
        self._since = 0
        c = self.calibration
        ft, fn = c.factors_text, c.factors_no_text
        if len(self._text) >= self.min_samples:
            s = np.stack(self._text)
            ft = tuple(conformal_factor(s[:, i], lv) for i, lv in enumerate(c.levels))
        if len(self._no_text) >= self.min_samples:
            s = np.stack(self._no_text)
            fn = tuple(conformal_factor(s[:, i], lv) for i, lv in enumerate(c.levels))
        if (ft, fn) == (c.factors_text, c.factors_no_text):
            return False
        self.calibration = Calibration(c.levels, ft, fn, c.num_samples, c.target_coverage)
        self.num_refits += 1
        return True
