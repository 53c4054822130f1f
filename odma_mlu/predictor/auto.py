"""The default predictor: online lengths everywhere, a learned text model only where it
has proved calibrated on this traffic.

Every request is predicted by the online predictor (``SimplePredictor``: per client and
prompt band, learned from completed lengths). Requests that carry text are also scored,
in the shadow, by the learned model; each completion tells whether the learned model's
``target_coverage`` quantile covered the true length and how far its median was off. The
learned model answers for text requests only while, over the last ``window`` of them,
its coverage is within ``coverage_tolerance`` of its target and its median error is no
worse than the online predictor's on the same requests. An Alpaca-trained model is thus
used on Alpaca-like traffic and ignored on reasoning traffic it was never trained on.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from odma_mlu.predictor.base import LengthPrediction, LengthPredictor, RequestFeatures
from odma_mlu.predictor.simple import SimplePredictor

MAX_SHADOW = 100_000


class AutoPredictor(LengthPredictor):
    name = "auto"

    def __init__(self, learned: LengthPredictor | None, online: LengthPredictor | None = None,
                 target_coverage: float = 0.8, window: int = 200, min_evidence: int = 50,
                 coverage_tolerance: float = 0.1) -> None:
        self.learned = learned
        self.online = online or SimplePredictor()
        self.target_coverage = target_coverage
        self.min_evidence = min_evidence
        self.coverage_tolerance = coverage_tolerance
        self._covered: deque[bool] = deque(maxlen=window)
        self._learned_err: deque[float] = deque(maxlen=window)
        self._online_err: deque[float] = deque(maxlen=window)
        self._shadow: dict[int, tuple[LengthPrediction, LengthPrediction]] = {}

    @property
    def learned_is_calibrated(self) -> bool:
        n = len(self._covered)
        if self.learned is None or n < self.min_evidence:
            return False
        coverage = sum(self._covered) / n
        if abs(coverage - self.target_coverage) > self.coverage_tolerance:
            return False
        return sum(self._learned_err) <= sum(self._online_err)

    def predict_batch(self, requests: Sequence[RequestFeatures]) -> list[LengthPrediction]:
        online = self.online.predict_batch(requests)
        texts = [i for i, r in enumerate(requests) if r.prompt_text is not None]
        if self.learned is None or not texts:
            return online
        learned = self.learned.predict_batch([requests[i] for i in texts])
        use_learned = self.learned_is_calibrated
        out = list(online)
        for i, pred in zip(texts, learned):
            self._shadow[id(requests[i])] = (pred, online[i])
            if len(self._shadow) > MAX_SHADOW:  # requests aborted before finishing never report back
                del self._shadow[next(iter(self._shadow))]
            if use_learned:
                out[i] = pred
        return out

    def predict(self, request: RequestFeatures) -> LengthPrediction:
        return self.predict_batch([request])[0]

    def observe(self, request: RequestFeatures, generated_tokens: int) -> None:
        self.online.observe(request, generated_tokens)
        shadow = self._shadow.pop(id(request), None)
        if shadow is None:
            return
        learned, online = shadow
        self.learned.observe(request, generated_tokens)  # type: ignore[union-attr]
        self._covered.append(generated_tokens <= learned.at(self.target_coverage))
        self._learned_err.append(abs(learned.median - generated_tokens))
        self._online_err.append(abs(online.median - generated_tokens))
