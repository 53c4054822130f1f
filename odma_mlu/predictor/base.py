"""The LengthPredictor interface: what the KV policies ask about a request before it runs.

A prediction is a set of quantiles of the generation length (tokens), so a policy can
reserve at the quantile it wants (``target_coverage``) and judge uncertainty from the
spread (``ratio``). Predictors may learn online from ``observe``.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

QUANTILES: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class RequestFeatures:
    """What is known about a request before generation. ``prompt_text`` may be absent
    (traces carry only lengths); predictors then work from length and metadata alone."""

    prompt_tokens: int
    max_new_tokens: int
    prompt_text: str | None = None
    temperature: float = 0.0
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LengthPrediction:
    """Quantiles of the generation length in tokens, non-decreasing, within [1, max_new_tokens]."""

    levels: tuple[float, ...]
    tokens: tuple[float, ...]

    def __post_init__(self) -> None:
        assert len(self.levels) == len(self.tokens) and self.levels, "quantile levels and values must pair up"
        assert all(a < b for a, b in zip(self.levels, self.levels[1:])), "quantile levels must increase"
        assert all(a <= b for a, b in zip(self.tokens, self.tokens[1:])), f"quantiles must not decrease: {self.tokens}"

    @classmethod
    def from_values(cls, values: Sequence[float], max_new_tokens: int,
                    levels: Sequence[float] = QUANTILES) -> "LengthPrediction":
        """Clip to [1, max_new_tokens] and sort (repairs quantile crossing)."""
        vals = sorted(min(float(max_new_tokens), max(1.0, float(v))) for v in values)
        return cls(tuple(levels), tuple(vals))

    def at(self, level: float) -> float:
        """The length at quantile ``level`` (linear between known levels, clamped at the ends)."""
        i = bisect.bisect_left(self.levels, level)
        if i < len(self.levels) and self.levels[i] == level:
            return self.tokens[i]
        if i == 0:
            return self.tokens[0]
        if i == len(self.levels):
            return self.tokens[-1]
        l0, l1 = self.levels[i - 1], self.levels[i]
        t = (level - l0) / (l1 - l0)
        return self.tokens[i - 1] + t * (self.tokens[i] - self.tokens[i - 1])

    @property
    def median(self) -> float:
        return self.at(0.5)

    @property
    def ratio(self) -> float:
        """Spread: the highest quantile over the median (1 = certain)."""
        return self.tokens[-1] / max(1.0, self.median)


class LengthPredictor(ABC):
    """Predicts generation lengths; may adapt from completed requests."""

    name: str = "predictor"

    @abstractmethod
    def predict(self, request: RequestFeatures) -> LengthPrediction: ...

    def predict_batch(self, requests: Sequence[RequestFeatures]) -> list[LengthPrediction]:
        return [self.predict(r) for r in requests]

    def observe(self, request: RequestFeatures, generated_tokens: int) -> None:
        """Feedback when a request finishes (online adaptation); default: nothing."""
