"""optimize_boundaries is exact: it matches a brute-force search over every edge combination."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odma_mlu.predictor.histogram import OnlineLengthHistogram, optimize_boundaries


def bin_uppers(max_tokens: int, bin_tokens: int) -> list[int]:
    num_bins = -(-max_tokens // bin_tokens)
    return [min((b + 1) * bin_tokens, max_tokens) for b in range(num_bins)]


def waste_of(edges: tuple[int, ...], lengths: np.ndarray, max_tokens: int, bin_tokens: int) -> float:
    """Mean reserved-minus-true tokens when each length takes the smallest edge >= its bin's upper edge."""
    ls = np.clip(lengths.astype(np.float64), 1, max_tokens)
    uppers = bin_uppers(max_tokens, bin_tokens)
    total = 0.0
    for v in ls:
        b = min(int((v - 1) // bin_tokens), len(uppers) - 1)
        e = next(x for x in edges if x >= uppers[b])
        total += e - v
    return total / ls.size


def brute_force(lengths: np.ndarray, max_tokens: int, k: int, bin_tokens: int) -> float:
    uppers = bin_uppers(max_tokens, bin_tokens)
    inner = uppers[:-1]
    best = float("inf")
    for r in range(0, k):
        for combo in itertools.combinations(inner, r):
            best = min(best, waste_of(tuple(combo) + (max_tokens,), lengths, max_tokens, bin_tokens))
    return best


CASES = st.tuples(
    st.integers(1, 90),  # max_tokens
    st.integers(1, 24),  # bin_tokens
    st.integers(1, 3),  # K
    st.lists(st.integers(-3, 110), min_size=1, max_size=30),
)


@settings(max_examples=200, deadline=None)
@given(case=CASES)
def test_optimizer_matches_brute_force(case: tuple[int, int, int, list[int]]) -> None:
    max_tokens, bin_tokens, k, raw = case
    if -(-max_tokens // bin_tokens) > 14:  # keep the brute force small
        bin_tokens = -(-max_tokens // 14)
    lengths = np.array(raw, dtype=np.float64)
    got = optimize_boundaries(lengths, max_tokens, k, bin_tokens)
    edges = got.edges_tokens
    assert edges[-1] == max_tokens
    assert list(edges) == sorted(set(edges)) and 1 <= len(edges) <= k
    assert set(edges) <= set(bin_uppers(max_tokens, bin_tokens))
    assert got.num_samples == len(raw)
    best = brute_force(lengths, max_tokens, k, bin_tokens)
    achieved = waste_of(edges, lengths, max_tokens, bin_tokens)
    assert achieved == pytest.approx(best, abs=1e-9)
    assert got.expected_waste_tokens == pytest.approx(best, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(max_tokens=st.integers(1, 600), bin_tokens=st.integers(1, 64),
       raw=st.lists(st.integers(1, 700), min_size=1, max_size=60))
def test_waste_weakly_decreases_with_k(max_tokens: int, bin_tokens: int, raw: list[int]) -> None:
    lengths = np.array(raw, dtype=np.float64)
    wastes = [optimize_boundaries(lengths, max_tokens, k, bin_tokens).expected_waste_tokens for k in range(1, 7)]
    assert all(b <= a + 1e-9 for a, b in zip(wastes, wastes[1:]))
    assert wastes[0] >= 0
    # one bucket is always max_tokens
    assert optimize_boundaries(lengths, max_tokens, 1, bin_tokens).edges_tokens == (max_tokens,)


def test_exact_small_example() -> None:
    lengths = np.array([10, 10, 10, 100, 100])
    b = optimize_boundaries(lengths, 512, 2, bin_tokens=16)
    assert b.edges_tokens == (112, 512)  # 3 x 102 + 2 x 12 beats 3 x 6 + 2 x 412
    assert b.expected_waste_tokens == pytest.approx((3 * 102 + 2 * 12) / 5)
    b = optimize_boundaries(lengths, 512, 3, bin_tokens=16)
    assert b.edges_tokens == (16, 112, 512)
    assert b.expected_waste_tokens == pytest.approx((3 * 6 + 2 * 12) / 5)
    assert b.bucket_for(5) == 0 and b.bucket_for(16) == 0 and b.bucket_for(17) == 1 and b.bucket_for(600) == 2


def test_no_data_gives_a_geometric_prior() -> None:
    b = optimize_boundaries(np.empty(0), 512, 4)
    assert b.edges_tokens == (64, 128, 256, 512) and b.num_samples == 0
    assert optimize_boundaries(np.empty(0), 3, 4).edges_tokens == (1, 2, 3)


def test_online_histogram_window_and_schedule() -> None:
    h = OnlineLengthHistogram(max_tokens=256, num_buckets=2, window=10, reoptimize_every=4, bin_tokens=8)
    assert h.boundaries.edges_tokens == (128, 256)
    results = [h.observe(20) for _ in range(4)]
    assert results == [False, False, False, True] and h.num_reoptimizations == 1
    assert h.boundaries.edges_tokens == (24, 256)
    for _ in range(12):
        h.observe(1000)  # clipped to 256; pushes the 20s out of the window
    assert len(h) == 10 and h.num_reoptimizations == 4
    assert h.boundaries.edges_tokens == (256,) or h.boundaries.edges_tokens[-1] == 256
    assert h.lengths().max() == 256 and h.quantile(0.5) == 256
    assert OnlineLengthHistogram(64, 2).quantile(0.5) is None
