"""Online histogram of generation lengths and the exact bucket-boundary optimizer.

The ``odma`` policy reserves for each request the smallest bucket that covers its
predicted length. Which K bucket sizes waste least depends on live traffic, so completed
requests feed a sliding-window histogram and the boundaries are re-optimized from it.

Optimizer (exact, dynamic programming over histogram bins)::

    edges e_1 < e_2 < ... < e_K = max_tokens        (bucket sizes, on bin upper edges)
    cost  = sum_bins count(bin) * (e(bin) - mid(bin))  e(bin) = smallest edge >= bin
    dp[k][j] = min_i dp[k-1][i] + cost(bins i+1..j with edge j)

``cost(i, j) = e_j * (C_j - C_i) - (S_j - S_i)`` with prefix counts C and length sums S,
so each DP layer is one vectorized min over a (candidates x candidates) matrix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BucketBoundaries:
    """Bucket sizes in tokens, increasing; the last always equals ``max_tokens``."""

    edges_tokens: tuple[int, ...]
    expected_waste_tokens: float
    num_samples: int

    def bucket_for(self, tokens: float) -> int:
        """Index of the smallest bucket >= tokens (the last one if none is)."""
        for i, e in enumerate(self.edges_tokens):
            if tokens <= e:
                return i
        return len(self.edges_tokens) - 1


def optimize_boundaries(lengths: np.ndarray, max_tokens: int, num_buckets: int,
                        bin_tokens: int = 16) -> BucketBoundaries:
    """Exact K-bucket boundaries minimizing expected reserved-minus-true tokens."""
    assert num_buckets >= 1, "num_buckets must be >= 1"
    assert max_tokens >= 1, "max_tokens must be >= 1"
    lengths = np.clip(np.asarray(lengths, dtype=np.float64), 1, max_tokens)
    if lengths.size == 0:
        # No data: geometric spacing up to max_tokens is a sane prior.
        edges = np.unique(np.ceil(max_tokens / 2.0 ** np.arange(num_buckets - 1, -1, -1)).astype(int))
        return BucketBoundaries(tuple(int(e) for e in edges), float("nan"), 0)
    num_bins = -(-max_tokens // bin_tokens)
    bin_idx = np.minimum(((lengths - 1) // bin_tokens).astype(np.int64), num_bins - 1)
    counts = np.bincount(bin_idx, minlength=num_bins).astype(np.float64)
    sums = np.bincount(bin_idx, weights=lengths, minlength=num_bins)
    upper = np.minimum((np.arange(num_bins) + 1) * bin_tokens, max_tokens).astype(np.float64)
    # Candidate edges: upper edges of non-empty bins, plus max_tokens (always the last edge).
    cand = np.flatnonzero(counts)
    if cand.size == 0 or cand[-1] != num_bins - 1:
        cand = np.append(cand, num_bins - 1)
    C = np.concatenate([[0.0], np.cumsum(counts)[cand]])  # prefix at candidate j (inclusive)
    S = np.concatenate([[0.0], np.cumsum(sums)[cand]])
    E = upper[cand]
    n = cand.size
    k_max = min(num_buckets, n)
    # cost[i, j]: bins after candidate i-1 up to candidate j, all reserved at E[j] (i <= j).
    i_idx = np.arange(n)[:, None]
    j_idx = np.arange(n)[None, :]
    cost = E[None, :] * (C[1:][None, :] - C[:-1][:, None]) - (S[1:][None, :] - S[:-1][:, None])
    cost = np.where(i_idx <= j_idx, cost, np.inf)
    dp = cost[0].copy()  # one bucket covering candidates 0..j
    back = np.zeros((k_max, n), dtype=np.int64)
    for k in range(1, k_max):
        # new[j] = min_{i<=j, i>=1} dp[i-1] + cost[i, j]
        total = dp[:-1][:, None] + cost[1:, :]
        arg = np.argmin(total, axis=0)
        new = total[arg, np.arange(n)]
        back[k] = arg + 1
        dp = new
    # Reconstruct from the last candidate (max_tokens) with k_max buckets.
    edges: list[int] = []
    j = n - 1
    for k in range(k_max - 1, -1, -1):
        edges.append(int(E[j]))
        if k == 0:
            break
        i = int(back[k][j])
        j = i - 1
    edges = sorted(set(edges))
    waste = float(dp[n - 1]) / float(lengths.size)
    return BucketBoundaries(tuple(edges), waste, int(lengths.size))


class OnlineLengthHistogram:
    """Sliding window of the last ``window`` observed lengths with periodic re-optimization."""

    def __init__(self, max_tokens: int, num_buckets: int, window: int = 2000, reoptimize_every: int = 200,
                 bin_tokens: int = 16, initial: BucketBoundaries | None = None) -> None:
        assert window >= 1 and reoptimize_every >= 1, "window and reoptimize_every must be >= 1"
        self.max_tokens = max_tokens
        self.num_buckets = num_buckets
        self.bin_tokens = bin_tokens
        self.reoptimize_every = reoptimize_every
        self._recent: deque[int] = deque(maxlen=window)
        self._recent_sum = 0
        self._since_reopt = 0
        self.num_reoptimizations = 0
        self.boundaries = initial or optimize_boundaries(np.empty(0), max_tokens, num_buckets, bin_tokens)

    def __len__(self) -> int:
        return len(self._recent)

    def lengths(self) -> np.ndarray:
        return np.fromiter(self._recent, dtype=np.float64, count=len(self._recent))

    def observe(self, tokens: int) -> bool:
        """Record a completed length; returns True if boundaries were re-optimized."""
        recent = self._recent
        if len(recent) == recent.maxlen:
            self._recent_sum -= recent[0]
        tokens = int(min(max(tokens, 1), self.max_tokens))
        recent.append(tokens)
        self._recent_sum += tokens
        self._since_reopt += 1
        if self._since_reopt >= self.reoptimize_every:
            self.reoptimize()
            return True
        return False

    def keep_only(self, lengths: Iterable[int]) -> None:
        """Replace the window by ``lengths`` (oldest first; drift: the lengths after a change)."""
        self._recent = deque((int(x) for x in lengths), maxlen=self._recent.maxlen)
        self._recent_sum = sum(self._recent)

    @property
    def mean_tokens(self) -> float | None:
        """Mean of the lengths in the window (None before the first)."""
        return self._recent_sum / len(self._recent) if self._recent else None

    def reoptimize(self) -> BucketBoundaries:
        self.boundaries = optimize_boundaries(self.lengths(), self.max_tokens, self.num_buckets, self.bin_tokens)
        self._since_reopt = 0
        self.num_reoptimizations += 1
        return self.boundaries

    def quantile(self, q: float) -> float | None:
        if not self._recent:
            return None
        return float(np.quantile(self.lengths(), q))
