"""A simple online predictor: quantiles of recently completed lengths, by prompt-length band.

No text, no training: it learns from ``observe`` alone, so it needs traffic before it
helps. Until then it answers a prior spread over [0, max_new_tokens]. It is the baseline
the learned predictor must beat inside the replay, and the fallback when none is bundled.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from odma_mlu.predictor.base import QUANTILES, LengthPrediction, LengthPredictor, RequestFeatures

PRIOR_FRACTIONS = (0.25, 0.5, 0.6, 0.8, 1.0)
"""Prior quantiles as fractions of max_new_tokens, before any request has finished."""


class SimplePredictor(LengthPredictor):
    name = "simple"

    def __init__(self, window: int = 2000, min_samples: int = 20, min_band_samples: int = 50) -> None:
        self.min_samples = min_samples
        self.min_band_samples = min_band_samples
        self._all: deque[int] = deque(maxlen=window)
        self._bands: dict[int, deque[int]] = {}
        self._window = window
        self._cache: dict[int | None, np.ndarray] = {}

    @staticmethod
    def _band(prompt_tokens: int) -> int:
        return int(math.log2(max(1, prompt_tokens)))

    def _quantiles(self, band: int | None) -> np.ndarray | None:
        if band in self._cache:
            return self._cache[band]
        data = self._all if band is None else self._bands.get(band)
        need = self.min_samples if band is None else self.min_band_samples
        if data is None or len(data) < need:
            return None
        q = np.quantile(np.fromiter(data, dtype=np.float64), QUANTILES)
        self._cache[band] = q
        return q

    def predict(self, request: RequestFeatures) -> LengthPrediction:
        q = self._quantiles(self._band(request.prompt_tokens))
        if q is None:
            q = self._quantiles(None)
        if q is None:
            q = np.array(PRIOR_FRACTIONS) * request.max_new_tokens
        return LengthPrediction.from_values(q.tolist(), request.max_new_tokens)

    def observe(self, request: RequestFeatures, generated_tokens: int) -> None:
        self._all.append(generated_tokens)
        self._bands.setdefault(self._band(request.prompt_tokens), deque(maxlen=self._window)).append(generated_tokens)
        self._cache.clear()
