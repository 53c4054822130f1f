"""Drift detection: a synthetic mid-stream switch of the length distribution.

Bound under test (also in docs/predictor.md): detected within 100 requests of the switch,
and from then on the boundaries waste at most 15% more than the optimum for the new
distribution; the plain histogram is still > 1.3x the optimum 1000 requests after it.
"""

from __future__ import annotations

import numpy as np

from odma_mlu.predictor.drift import DriftAwareHistogram, ks_critical, ks_statistic
from odma_mlu.predictor.histogram import BucketBoundaries, OnlineLengthHistogram, optimize_boundaries

MAX_TOKENS = 2048
DETECT_WITHIN = 100
WASTE_RATIO_BOUND = 1.15


def _waste(b: BucketBoundaries, xs: np.ndarray) -> float:
    e = np.array(b.edges_tokens)
    return float((e[np.minimum(np.searchsorted(e, xs), len(e) - 1)] - xs).mean())


def _streams(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = np.clip(rng.lognormal(np.log(80), 0.5, 3000), 1, MAX_TOKENS).astype(int)
    b = np.clip(rng.lognormal(np.log(600), 0.4, 1500), 1, MAX_TOKENS).astype(int)
    b_test = np.clip(rng.lognormal(np.log(600), 0.4, 20000), 1, MAX_TOKENS).astype(int)
    return a, b, b_test


def test_ks_statistic_basics() -> None:
    x = np.arange(100.0)
    assert ks_statistic(x, x) == 0.0
    assert ks_statistic(x, x + 1000) == 1.0
    assert 0.1 < ks_critical(200, 1800, 1e-3) < 0.2


def test_no_false_alarm_on_stationary_stream() -> None:
    rng = np.random.default_rng(1)
    h = DriftAwareHistogram(MAX_TOKENS, 8)
    for x in np.clip(rng.lognormal(np.log(100), 0.7, 6000), 1, MAX_TOKENS).astype(int):
        h.observe(int(x))
    assert h.num_drifts == 0


def test_boundaries_track_switch_within_bound() -> None:
    for seed in range(3):
        a, b, b_test = _streams(seed)
        best = _waste(optimize_boundaries(b_test, MAX_TOKENS, 8), b_test)
        drift, plain = DriftAwareHistogram(MAX_TOKENS, 8), OnlineLengthHistogram(MAX_TOKENS, 8)
        for x in a:
            drift.observe(int(x))
            plain.observe(int(x))
        assert drift.num_drifts == 0
        for i, x in enumerate(b, start=1):
            drift.observe(int(x))
            plain.observe(int(x))
            if i == DETECT_WITHIN:
                assert drift.num_drifts >= 1, f"seed {seed}: drift not detected within {DETECT_WITHIN} requests"
            if i >= DETECT_WITHIN and i % 50 == 0:
                ratio = _waste(drift.boundaries, b_test) / best
                assert ratio <= WASTE_RATIO_BOUND, f"seed {seed}, {i} requests after the switch: waste x{ratio:.2f}"
            if i == 1000:
                assert _waste(plain.boundaries, b_test) / best > 1.3, "the plain histogram should still lag"


def test_detector_plugs_into_odma_policy_hook() -> None:
    """The policy calls ``detector.observe(tokens, histogram)`` and re-optimizes on True."""
    from odma_mlu.predictor.drift import KSDriftDetector

    a, b, b_test = _streams(7)
    hist, det = OnlineLengthHistogram(MAX_TOKENS, 8), KSDriftDetector()
    best = _waste(optimize_boundaries(b_test, MAX_TOKENS, 8), b_test)
    for x in np.concatenate([a, b[:DETECT_WITHIN]]):
        reopt = hist.observe(int(x))
        if not reopt and det.observe(int(x), hist):
            hist.reoptimize()
    assert det.num_drifts >= 1 and _waste(hist.boundaries, b_test) / best <= WASTE_RATIO_BOUND
