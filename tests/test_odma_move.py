"""ODMA moves the run that blocks a growing request (``OdmaPolicy._move_blocker``): priced by
``move_pays``, never a pinned run or a ring, the blocker's KV intact at its new place, the
scheduler told (``take_moved``) so no cached location goes stale."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from odma_mlu.config import SchedulerConfig
from odma_mlu.engine.request import Sequence
from odma_mlu.engine.scheduler import Scheduler
from odma_mlu.kvcache.odma import OdmaPolicy
from odma_mlu.kvcache.policy import GrowStatus
from odma_mlu.kvcache.run_pricing import move_pays
from policy_helpers import TINY, arena, pred, rr
from test_odma_policy import CERTAIN, CFG, _fill


class _RunsCost:
    """Every run read costs ``run`` seconds; a copy ``copy_per_token`` a token."""

    def __init__(self, run: float = 1.0, copy_per_token: float = 1e-6) -> None:
        self.run = run
        self.copy_per_token = copy_per_token

    def read_run_s(self, tokens: int) -> float:
        return self.run + tokens * 1e-6

    def copy_s(self, tokens: int, num_pending: int = 0) -> float:
        return self.copy_per_token * tokens

    def decode_fixed_s(self) -> float:
        return float("inf")  # memory priced out of reach: no room held past chunk_tokens

    def view_min_tokens(self) -> int | None:
        return None  # no view rule: ODMA never compacts


def _blocked_pair(cost: _RunsCost, b_pinned: bool = False, a_per_block: bool = False) -> OdmaPolicy:
    """Strict claims, 1-token granules: a holds [0, 24) and has filled it, b holds [24, 48)
    with its 8 prompt tokens live; a's 25th token is blocked by b's run."""
    p = OdmaPolicy(arena(400, real=True), 64, CFG, granule_tokens=1, run_cost=cost)
    p.reserve(replace(rr("a", 8, 64, prediction=pred(CERTAIN, 64)), read_per_block=a_per_block))
    p.reserve(replace(rr("b", 8, 64, prediction=pred(CERTAIN, 64)), pinned=b_pinned))
    _fill(p, "a", 9, 24)
    assert p.location("a").runs == ((0, 24),) and p.location("b").runs == ((24, 24),)
    return p


def test_a_blocked_request_moves_the_blocking_run_and_grows_in_place() -> None:
    p = _blocked_pair(_RunsCost())
    ar = p.arena
    gen = torch.Generator().manual_seed(0)
    b_kv = [torch.randn(8, TINY.num_kv_heads, TINY.head_dim, generator=gen) for _ in range(TINY.num_layers)]
    for layer in range(TINY.num_layers):
        ar.k[layer][24:32] = b_kv[layer]
    res = p.ensure_capacity("a", 25)
    assert res.status == GrowStatus.OK and res.how == "in_place"
    assert p.location("a").num_runs == 1 and p.location("a").start_slot == 0
    (b_start, b_len), = p.location("b").runs
    assert b_len == 24 and b_start >= 40  # whole, one run, past a's raised claim
    assert ar.take_issued_copies().tokens == (8,)  # b's live tokens only: its held room moves for free
    for layer in range(TINY.num_layers):
        assert torch.equal(ar.k[layer][b_start:b_start + 8], b_kv[layer])
    assert p.copies == 1 and p.copied_tokens == 8 and p.moved_runs == 1
    assert p.take_moved() == ("b",) and p.take_moved() == ()
    p.check_integrity()


def test_no_move_where_the_copy_costs_more_than_the_run_it_saves() -> None:
    p = _blocked_pair(_RunsCost(run=1.0, copy_per_token=1e3))
    res = p.ensure_capacity("a", 25)
    assert res.status == GrowStatus.OK and res.how == "new_run"
    assert p.location("b").runs == ((24, 24),) and p.take_moved() == () and p.moved_runs == 0
    assert p.arena.take_issued_copies().tokens == ()
    p.check_integrity()


@pytest.mark.parametrize("b_pinned, a_per_block", [(True, False), (False, True)])
def test_pinned_runs_and_rings_are_never_moved(b_pinned: bool, a_per_block: bool) -> None:
    """A pinned blocker (a shared prefix block) stays; a grower read per block (a ring) gains
    nothing from one run, so it never moves anyone."""
    p = _blocked_pair(_RunsCost(), b_pinned=b_pinned, a_per_block=a_per_block)
    res = p.ensure_capacity("a", 25)
    assert res.status == GrowStatus.OK and res.how in ("new_run", "copied")
    assert p.location("b").runs == ((24, 24),) and p.take_moved() == () and p.moved_runs == 0
    p.check_integrity()


def test_move_pays_prices_the_saved_run_against_the_copy() -> None:
    cost = _RunsCost(run=1.0, copy_per_token=0.1)
    # live 100 of which 90 prompt, claim 200: expected steps min(100 // 2, 10) = 10
    grower = dict(claim_tokens=200, live_tokens=100, prompt_tokens=90)
    assert move_pays(cost, 1, **grower, moved_tokens=0)  # nothing live: free
    assert move_pays(cost, 1, **grower, moved_tokens=99)  # 10 x 1 s > 9.9 s
    assert not move_pays(cost, 1, **grower, moved_tokens=101)


def test_the_scheduler_drops_the_moved_requests_cached_location() -> None:
    """b's location is cached before a's growth (in ``schedule``) moves b's run; the next
    look-up must see the new run, or the engine would read and write b's KV at its old slots."""
    p = _blocked_pair(_RunsCost())
    sched = Scheduler(p, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64))
    a, b = Sequence("a", 8, 64), Sequence("b", 8, 64)
    a.num_generated, a.kv_tokens = 17, 24  # decoding its 25th token: blocked by b
    b.num_generated, b.kv_tokens = 1, 8
    sched.running.extend([a, b])
    before = sched.location(b)
    batch = sched.schedule()
    assert {s.request_id for s in batch.decode} == {"a", "b"} and not batch.preempted
    assert p.moved_runs == 1
    assert sched.location(b) != before and sched.location(b) == p.location("b")
    assert sched.location(a) == p.location("a") and sched.location(a).num_runs == 1
