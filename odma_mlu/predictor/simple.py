"""The online predictor: quantiles of recently completed lengths, per client and
prompt-length band, learned from ``observe`` alone (no text, no training).

Keys, most specific first; the first with enough samples answers::

    (client, prompt band)  ->  client  ->  prompt band  ->  all traffic  ->  prior

``client`` is ``RequestFeatures.metadata["client"]`` where the traffic carries one (the
server's API key or user, a trace's client id); the prompt band is log2 of the prompt
length. Until anything has finished it answers a prior spread over [0, max_new_tokens].
It is the default wherever requests carry no text (ServeGen, Azure, Mooncake) and the
fallback of ``AutoPredictor`` until a learned model proves calibrated for the traffic.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Hashable

import numpy as np

from odma_mlu.predictor.base import QUANTILES, LengthPrediction, LengthPredictor, RequestFeatures

PRIOR_FRACTIONS = (0.25, 0.5, 0.6, 0.8, 1.0)
"""Prior quantiles as fractions of max_new_tokens, before any request has finished."""


class SimplePredictor(LengthPredictor):
    name = "simple"

    def __init__(self, window: int = 2000, min_samples: int = 20, min_key_samples: int = 50) -> None:
        self.window = window
        self.min_samples = min_samples
        self.min_key_samples = min_key_samples
        self._data: dict[Hashable, deque[int]] = {}
        self._cache: dict[Hashable, np.ndarray | None] = {}

    @staticmethod
    def _keys(request: RequestFeatures) -> tuple[Hashable, ...]:
        band = ("band", int(math.log2(max(1, request.prompt_tokens))))
        client = request.metadata.get("client") if request.metadata else None
        if client is None:
            return (band, ("all",))
        return (("client-band", str(client), band[1]), ("client", str(client)), band, ("all",))

    def _quantiles(self, key: Hashable) -> np.ndarray | None:
        if key in self._cache:
            return self._cache[key]
        data = self._data.get(key)
        need = self.min_samples if key == ("all",) else self.min_key_samples
        q = None if data is None or len(data) < need else np.quantile(np.fromiter(data, dtype=np.float64), QUANTILES)
        self._cache[key] = q
        return q

    def predict(self, request: RequestFeatures) -> LengthPrediction:
        for key in self._keys(request):
            q = self._quantiles(key)
            if q is not None:
                return LengthPrediction.from_values(q.tolist(), request.max_new_tokens)
        return LengthPrediction.from_values([f * request.max_new_tokens for f in PRIOR_FRACTIONS],
                                            request.max_new_tokens)

    def observe(self, request: RequestFeatures, generated_tokens: int) -> None:
        for key in self._keys(request):
            self._data.setdefault(key, deque(maxlen=self.window)).append(generated_tokens)
            self._cache.pop(key, None)
