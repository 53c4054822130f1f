"""ODMA's room held ahead of a growing request: the cost-optimal run length
(``OdmaPolicy._ahead_tokens``, docs/odma-design.md) and the length mean it reads."""

from __future__ import annotations

import sys
from math import isqrt, sqrt
from pathlib import Path

import pytest
import torch

from emulator.cost_model import CostModel
from emulator.profile import DeviceProfile, load_profile
from odma_mlu.config import OdmaConfig, load_model_spec
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.odma import OdmaPolicy
from odma_mlu.kvcache.policy import GrowStatus, ReserveRequest
from odma_mlu.predictor.base import LengthPrediction
from odma_mlu.predictor.histogram import OnlineLengthHistogram
from policy_helpers import TINY

CFG = OdmaConfig(safety_fraction=0.0, chunk_tokens=4)


class _Priced:
    """Every run costs ``split_s`` more than one long run; a step's fixed part ``fixed_s``."""

    def __init__(self, split_s: float, fixed_s: float) -> None:
        self.split_s, self.fixed_s = split_s, fixed_s

    def read_run_s(self, tokens: int) -> float:
        return 0.0 if tokens <= 0 else self.split_s + tokens * 1e-9

    def copy_s(self, tokens: int, num_pending: int = 0) -> float:
        return float("inf")  # never copy: this file is about holds

    def decode_fixed_s(self) -> float:
        return self.fixed_s

    def view_min_tokens(self) -> int | None:
        return None  # no view rule: ODMA never compacts


def _policy(cost: _Priced | None, capacity: int = 1000) -> OdmaPolicy:
    arena = KVArena(TINY, capacity, dtype=torch.float32, shape_only=True)
    return OdmaPolicy(arena, 512, CFG, run_cost=cost, granule_tokens=1, min_run_tokens=1)


def _held_after_growth(p: OdmaPolicy, lengths: list[int]) -> int:
    """Tokens held past the live ones by a request that just needed one more token."""
    for n in lengths:
        p.histogram.observe(n)
    prediction = LengthPrediction.from_values([400.0] * 5, 512)
    p.reserve(ReserveRequest("a", 10, 512, 10, prediction))
    assert p.ensure_capacity("a", 30).status == GrowStatus.OK
    return p.location("a").capacity_tokens - 30


def test_a_growing_request_holds_the_economic_run_length() -> None:
    # price of a token: 1e-3 s / 1000 tokens = 1e-6 s; a run: 1e-4 s; mean length 100:
    # h* = sqrt(1e-4 * 100 / 1e-6) = 100 tokens; the hold target is needed - 1 + h*.
    p = _policy(_Priced(split_s=1e-4, fixed_s=1e-3))
    held = _held_after_growth(p, [50, 150])
    assert held == round(sqrt(1e-4 * 100 / 1e-6)) - 1 == 99


def test_the_hold_grows_as_the_square_root_of_the_run_cost() -> None:
    holds = [_held_after_growth(_policy(_Priced(split_s=s, fixed_s=1e-3)), [100] * 4) for s in (1e-5, 4e-5, 16e-5)]
    assert holds[0] < holds[1] < holds[2]
    assert abs((holds[2] + 1) / (holds[0] + 1) - 4.0) < 0.1  # 16x the cost -> 4x the run


@pytest.mark.parametrize("case", ["no cost model", "no completed length yet", "cheap runs"])
def test_the_hold_falls_back_to_chunk_tokens(case: str) -> None:
    cost = None if case == "no cost model" else _Priced(split_s=1e-12 if case == "cheap runs" else 1e-4, fixed_s=1e-3)
    lengths = [] if case == "no completed length yet" else [100, 100]
    assert _held_after_growth(_policy(cost), lengths) == CFG.chunk_tokens - 1


def test_a_new_request_holds_chunk_tokens_ahead_whatever_the_costs() -> None:
    p = _policy(_Priced(split_s=1e-4, fixed_s=1e-3))
    p.histogram.observe(100)
    loc = p.reserve(ReserveRequest("a", 10, 512, 10, LengthPrediction.from_values([400.0] * 5, 512)))
    assert loc.capacity_tokens == 10 + CFG.chunk_tokens


def test_derived_mlu370_holds_one_page_for_alpaca_and_more_where_runs_cost_more() -> None:
    """The shipped profile reads a 16-token page at 0.93 of a stream: for Alpaca's lengths
    (mean 126 tokens; 250 here, for margin) the economic run is under a page, so the hold
    stays one page; the same card with a gather curve at 0.3 (tools/contiguity_sweep.py)
    holds several."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from contiguity_sweep import reshape_profile

    model = load_model_spec()
    derived = load_profile("mlu370-x4")
    page_bytes = 16 * model.kv_bytes_per_token_per_layer // 2

    def economic_run(profile: DeviceProfile) -> int:
        cost = CostModel(profile, model)
        split_s = cost.read_run_s(16) + cost.read_run_s(200) - cost.read_run_s(216)
        return isqrt(int(split_s * 250 / (cost.decode_fixed_s() / 117_971)))

    assert economic_run(derived) < 16 < 48 < economic_run(reshape_profile(derived, 0.3, page_bytes))


def test_histogram_mean_follows_the_window_and_drift_resets() -> None:
    h = OnlineLengthHistogram(max_tokens=1000, num_buckets=4, window=3)
    assert h.mean_tokens is None
    for n in (10, 20, 30, 40):  # the window keeps 20, 30, 40
        h.observe(n)
    assert h.mean_tokens == pytest.approx(30.0)
    h.observe(5000)  # clipped to max_tokens
    assert h.mean_tokens == pytest.approx((30 + 40 + 1000) / 3)
    h.keep_only([7, 9])
    assert h.mean_tokens == pytest.approx(8.0) and len(h) == 2
    h.observe(11)
    h.observe(13)  # window of 3 again: 9, 11, 13
    assert h.mean_tokens == pytest.approx(11.0)
