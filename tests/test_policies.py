"""KV policies other than ODMA: exact sizes and runs per policy, paged's free-queue order,
ideal, and the arena and location the policies hand out (ODMA: test_odma_policy.py)."""

from __future__ import annotations

import random

import pytest

from odma_mlu.config import load_model_spec
from odma_mlu.kvcache.arena import KVArena, KVLocation, covering_runs
from odma_mlu.kvcache.exact import ExactPolicy
from odma_mlu.kvcache.paged import IdealPolicy, PagedPolicy
from odma_mlu.kvcache.policy import GrowStatus
from odma_mlu.kvcache.s3 import S3Policy
from odma_mlu.kvcache.static import StaticPolicy
from policy_helpers import arena, pred, rr


# -- static / exact -----------------------------------------------------------------------
def test_static_reserves_prompt_plus_max_new() -> None:
    p = StaticPolicy(arena(1000))
    loc = p.reserve(rr("a", 10, 50))
    assert (loc.start_slot, loc.capacity_tokens) == (0, 60)
    loc = p.reserve(rr("b", 7, 100, true=3))
    assert (loc.start_slot, loc.capacity_tokens) == (60, 107)
    assert p.reserved_tokens() == 167 and p.num_live() == 2
    for t in range(11, 61):
        assert p.ensure_capacity("a", t).status == GrowStatus.OK
    assert p.overflowed_requests == 0
    p.check_integrity()
    p.release("a", 50)
    p.release("b", 3)
    assert p.reserved_tokens() == 0 and p.num_live() == 0


def test_static_waits_when_full() -> None:
    p = StaticPolicy(arena(100))
    assert p.reserve(rr("a", 10, 50)) is not None
    assert not p.can_reserve(rr("b", 10, 50))
    assert p.reserve(rr("b", 10, 50)) is None
    assert p.num_live() == 1
    p.check_integrity()


def test_exact_reserves_prompt_plus_true_length() -> None:
    p = ExactPolicy(arena(1000))
    assert p.reserve(rr("a", 10, 50, true=20)).capacity_tokens == 30
    assert p.reserve(rr("b", 10, 50, true=80)).capacity_tokens == 60  # capped at max_new
    assert p.reserve(rr("c", 10, 50)).capacity_tokens == 60  # unknown: worst case
    # a recompute after preemption never gets less than it must prefill
    assert p.reserve(rr("d", 10, 50, num_tokens=29, true=20)).capacity_tokens == 30
    for t in range(11, 31):
        assert p.ensure_capacity("a", t).status == GrowStatus.OK
    assert p.overflowed_requests == 0
    p.check_integrity()


# -- s3 --------------------------------------------------------------------------------------
def test_s3_equal_width_buckets_from_the_median() -> None:
    p = S3Policy(arena(10_000), num_buckets=10)
    assert [p.bucket_edge(100, i) for i in range(10)] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert [p.bucket_edge(95, i) for i in (0, 1, 9)] == [10, 19, 95]
    cases = {1: 10, 10: 10, 10.5: 20, 35: 40, 40: 40, 99: 100, 100: 100}
    for i, (median, edge) in enumerate(cases.items()):
        req = rr(f"r{i}", 5, 100, prediction=pred([median] * 5, 100))
        assert p.reserve(req).capacity_tokens == 5 + edge, median
    # no prediction: the whole range
    assert p.reserve(rr("none", 5, 100)).capacity_tokens == 105
    p.check_integrity()


def test_s3_requeues_on_overflow_then_takes_the_next_bucket() -> None:
    p = S3Policy(arena(10_000), num_buckets=10)
    prompt = 5
    loc = p.reserve(rr("a", prompt, 100, prediction=pred([35] * 5, 100)))
    assert loc.capacity_tokens == prompt + 40
    for t in range(prompt + 1, prompt + 41):
        assert p.ensure_capacity("a", t).status == GrowStatus.OK
    res = p.ensure_capacity("a", prompt + 41)
    assert res.status == GrowStatus.REQUEUE
    assert p.overflowed_requests == 1
    p.release("a", None)  # preempted: recomputed later
    assert p.reserved_tokens() == 0
    loc = p.reserve(rr("a", prompt, 100, num_tokens=prompt + 41, prediction=pred([35] * 5, 100)))
    assert loc.capacity_tokens == prompt + 50
    for t in range(prompt + 42, prompt + 51):
        assert p.ensure_capacity("a", t).status == GrowStatus.OK
    assert p.ensure_capacity("a", prompt + 51).status == GrowStatus.REQUEUE
    p.release("a", None)
    assert p.reserve(rr("a", prompt, 100, num_tokens=prompt + 51, prediction=pred([35] * 5, 100))).capacity_tokens \
        == prompt + 60
    p.release("a", 55)
    p.check_integrity()
    # finishing forgets the raised floor: the id starts from its prediction again
    assert p.reserve(rr("a", prompt, 100, prediction=pred([35] * 5, 100))).capacity_tokens == prompt + 40


# -- paged and ideal -------------------------------------------------------------------------
def test_paged_takes_pages_in_vllm_free_queue_order_and_merges_adjacent_ones() -> None:
    p = PagedPolicy(arena(64), page_tokens=16)  # 4 pages
    assert p.num_pages == 4 and p.max_request_tokens() == 64
    la = p.reserve(rr("a", 20, 40))
    assert la.runs == ((0, 32),) and la.capacity_tokens == 32  # pages 0, 1: one run
    assert la.slot_of(0) == 0 and la.slot_of(17) == 17
    assert p.ensure_capacity("a", 32).status == GrowStatus.OK
    res = p.ensure_capacity("a", 33)
    assert res.status == GrowStatus.OK and res.how == "pages"
    assert p.location("a").runs == ((0, 48),)
    assert p.reserve(rr("b", 16, 10)).runs == ((48, 16),)
    assert p.reserved_tokens() == 64
    assert not p.can_reserve(rr("c", 1, 10))
    assert p.reserve(rr("c", 1, 10)) is None
    assert p.ensure_capacity("a", 48).status == GrowStatus.OK
    assert p.ensure_capacity("a", 49).status == GrowStatus.NO_ROOM
    assert p.location("a").runs == ((0, 48),)  # unchanged by the failed grow
    p.check_integrity()
    p.release("b", 1)  # page 3 goes to the tail of the free queue
    assert p.ensure_capacity("a", 49).status == GrowStatus.OK
    assert p.location("a").runs == ((0, 64),)
    p.release("a", 29)  # freed last page first: queue 3, 2, 1, 0
    assert p.reserved_tokens() == 0 and p.num_live() == 0
    lc = p.reserve(rr("c", 40, 10))  # pages 3, 2, 1: three runs, scattered as in production
    assert lc.runs == ((48, 16), (32, 16), (16, 16))
    assert lc.slot_of(20) == 36 and lc.slots(14, 4).tolist() == [62, 63, 32, 33]
    assert p.read_runs("c", 40) == (16, 16, 8)
    p.check_integrity()


def test_paged_admission_keeps_the_watermark_free() -> None:
    p = PagedPolicy(arena(160), page_tokens=16, watermark_fraction=0.25)  # 10 pages, 40 tokens kept
    assert p.watermark_tokens == 40
    assert p.reserve(rr("a", 64, 100)) is not None  # 96 free after
    assert p.can_reserve(rr("b", 48, 10))  # 48 free after
    assert not p.can_reserve(rr("c", 64, 10))  # would leave 32 < 40
    assert p.reserve(rr("c", 64, 10)) is None
    # growth of admitted requests may use the watermark
    assert p.ensure_capacity("a", 160).status == GrowStatus.OK
    assert p.free_tokens() == 0


def test_ideal_holds_exactly_live_tokens_reads_one_run_and_preempts_for_free() -> None:
    p = IdealPolicy(arena(100))
    assert p.free_preemption and p.watermark_tokens == 0
    p.reserve(rr("a", 7, 50))
    assert p.reserved_tokens() == 7
    assert p.ensure_capacity("a", 8).status == GrowStatus.OK and p.reserved_tokens() == 8
    p.reserve(rr("b", 10, 50))
    p.ensure_capacity("a", 9)  # a's ninth token lands after b's: two runs ...
    assert p.location("a").num_runs == 2
    assert p.read_runs("a", 9) == (9,)  # ... but read as one sequential run
    p.check_integrity()


def test_kv_location_runs() -> None:
    loc = KVLocation(((100, 4), (40, 3)))
    assert loc.capacity_tokens == 7 and loc.num_runs == 2 and loc.start_slot == 100
    assert [loc.slot_of(t) for t in range(7)] == [100, 101, 102, 103, 40, 41, 42]
    assert loc.slots(2, 4).tolist() == [102, 103, 40, 41]
    assert loc.run_tokens(5) == (4, 1) and loc.run_tokens(4) == (4,)
    assert loc.first_run_covers(4) and not loc.first_run_covers(5)


def test_7b_spec_shape_only_arena() -> None:
    spec = load_model_spec()
    a = KVArena(spec, 100_000, shape_only=True)
    assert a.k == [] and a.bytes_per_token == spec.kv_bytes_per_token
    p = StaticPolicy(a)
    assert p.reserve(rr("a", 100, 512)).capacity_tokens == 612


def _covering_reference(run_lengths: list[int], num_tokens: int) -> tuple[int, ...]:
    """Walk the runs from the front: each run the read reaches, cut where the read ends."""
    out, left = [], num_tokens
    for n in run_lengths:
        if left <= 0:
            break
        out.append(min(n, left))
        left -= n
    return tuple(out)


def test_covering_runs_trims_the_runs_past_the_read() -> None:
    assert covering_runs([16, 16, 8], 40) == (16, 16, 8)  # the whole
    assert covering_runs([16, 16, 8], 32) == (16, 16)  # a run wholly past the read is not read
    assert covering_runs([16, 16, 8], 31) == (16, 15)
    assert covering_runs([16, 16, 8], 1) == (1,)
    assert covering_runs([16, 16, 8], 0) == ()
    with pytest.raises(AssertionError, match="goes past the runs"):
        covering_runs([16, 16, 8], 41)
    rng = random.Random(0)
    for _ in range(500):
        runs = [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
        n = rng.randint(0, sum(runs))
        assert covering_runs(runs, n) == _covering_reference(runs, n), (runs, n)
