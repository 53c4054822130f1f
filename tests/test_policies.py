"""KV policies: exact sizes and runs per policy, paged's free-queue order, ideal, ODMA v2's
placement, growth, copy decision and admission, and KV contents across a copy."""

from __future__ import annotations

from dataclasses import replace

import torch

from odma_mlu.config import ModelSpec, OdmaConfig, load_model_spec
from odma_mlu.kvcache.arena import KVArena, KVLocation
from odma_mlu.kvcache.odma import OdmaPolicy
from odma_mlu.kvcache.exact import ExactPolicy
from odma_mlu.kvcache.paged import IdealPolicy, PagedPolicy
from odma_mlu.kvcache.policy import GrowStatus, ReserveRequest
from odma_mlu.kvcache.s3 import S3Policy
from odma_mlu.kvcache.static import StaticPolicy
from odma_mlu.predictor.base import LengthPrediction

TINY = ModelSpec(name="tiny", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 intermediate_size=64, vocab_size=100, max_position_embeddings=4096, dtype="float32")


def arena(cap: int, real: bool = False) -> KVArena:
    return KVArena(TINY, cap, dtype=torch.float32, shape_only=not real)


def pred(values: list[float], max_new: int) -> LengthPrediction:
    return LengthPrediction.from_values(values, max_new)


def rr(rid: str, prompt: int, max_new: int, num_tokens: int | None = None, prediction: LengthPrediction | None = None,
       true: int | None = None) -> ReserveRequest:
    return ReserveRequest(rid, prompt, max_new, prompt if num_tokens is None else num_tokens, prediction, true)


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


# -- odma ------------------------------------------------------------------------------------
# Granules of 1 token so offsets are exact; strict mode (the paper's up-front claims) first.
CFG = OdmaConfig(num_buckets=4, safety_fraction=0.25, uncertainty_ratio=3.0, target_coverage=0.9,
                 reoptimize_every=5, histogram_bin_tokens=8, growth_factor=2.0, elastic=False,
                 long_request_tokens=10_000)
CERTAIN = [10, 12, 14, 15, 20]  # at(0.9) = 14, ratio 2
UNCERTAIN = [5, 10, 20, 30, 40]  # ratio 8


def odma(cap: int = 400, cfg: OdmaConfig = CFG, real: bool = False, max_new: int = 64, granule: int = 1,
         watermark: float = 0.0) -> OdmaPolicy:
    return OdmaPolicy(arena(cap, real), max_new, cfg, watermark_fraction=watermark, granule_tokens=granule)


def _fill(p: OdmaPolicy, rid: str, t_from: int, t_to: int) -> None:
    for t in range(t_from, t_to + 1):
        assert p.ensure_capacity(rid, t).status == GrowStatus.OK


def test_odma_regions_and_prior_buckets() -> None:
    p = odma()
    assert p.main.capacity_tokens == 300 and p.safety is not None and p.safety.capacity_tokens == 100
    assert p.safety.base == 300
    assert p.histogram.boundaries.edges_tokens == (8, 16, 32, 64)
    assert p.max_request_tokens() == 400


def test_odma_claim_from_prediction_at_target_coverage() -> None:
    p = odma()
    loc = p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))
    assert loc.runs == ((0, 8 + 16),)  # strict: the whole claim
    loc = p.reserve(rr("b", 8, 64, prediction=pred([3, 4, 5, 6, 7], 64)))
    assert loc.runs == ((24, 8 + 8),)
    loc = p.reserve(rr("c", 8, 64, prediction=pred([20, 25, 40, 50, 55], 64)))  # at(0.9)=40 -> 64
    assert loc.runs == ((40, 8 + 64),)
    loc = p.reserve(rr("d", 8, 20, prediction=pred([17, 17, 18, 19, 20], 20)))  # capped at max_new
    assert loc.capacity_tokens == 8 + 20
    assert p.safety.used_tokens == 0
    p.check_integrity()


def test_odma_uncertain_and_long_requests_start_in_the_safety_region() -> None:
    p = odma()
    loc = p.reserve(rr("u", 8, 64, prediction=pred(UNCERTAIN, 64)))  # at(0.9)=20 -> 32
    assert loc.runs == ((300, 40),)
    assert p.reserve(rr("none", 4, 50)).runs == ((340, 54),)  # no prediction: uncertain
    # safety region full: spills into the main region
    assert p.reserve(rr("u2", 8, 64, prediction=pred(UNCERTAIN, 64))).runs == ((0, 40),)
    long_cfg = replace(CFG, long_request_tokens=50)
    q = odma(cfg=long_cfg)
    assert q.reserve(rr("long", 8, 64, prediction=pred([20, 25, 40, 50, 55], 64))).start_slot == 300
    assert q.reserve(rr("short", 8, 64, prediction=pred(CERTAIN, 64))).start_slot == 0
    p.check_integrity()
    q.check_integrity()


def test_odma_elastic_places_after_the_left_neighbours_room_and_grows_in_place() -> None:
    cfg = replace(CFG, elastic=True, chunk_tokens=4, safety_fraction=0.0)
    p = odma(cfg=cfg)
    assert p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64))).runs == ((0, 12),)  # claim 24, holds 8 + 4
    # b is placed after a's room (a expects to reach 24 slots)
    assert p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64))).runs == ((24, 12),)
    _fill(p, "a", 9, 24)
    assert p.location("a").runs == ((0, 24),)  # grew in place into its room
    assert p.in_place_grows >= 3 and p.new_runs == 0
    p.check_integrity()


def test_odma_overflow_starts_a_new_run_instead_of_copying() -> None:
    p = odma()
    p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))  # [0, 24)
    p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64)))  # [24, 48)
    _fill(p, "a", 9, 24)
    res = p.ensure_capacity("a", 25)
    assert res.status == GrowStatus.OK and res.how == "new_run" and res.copied_tokens == 0
    # the claim rose to prompt + max(bucket(17)=32, 2 * 16) = 40: a new run of 16 more
    loc = p.location("a")
    assert loc.runs == ((0, 24), (48, 16)) and loc.capacity_tokens == 40
    assert p.read_runs("a", 25) == (24, 1)
    assert p.overflowed_requests == 1 and p.arena.moved_bytes == 0
    p.check_integrity()


def test_odma_overflow_extends_in_place_when_the_right_side_is_free() -> None:
    p = odma()
    p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))  # [0, 24)
    _fill(p, "a", 9, 24)
    res = p.ensure_capacity("a", 25)
    assert res.how == "in_place" and p.location("a").runs == ((0, 40),)
    p.check_integrity()


class _Cost:
    """Reads of short runs are slow, copies cheap: copying pays."""

    def read_run_s(self, tokens: int) -> float:
        return 1.0 if tokens < 30 else tokens * 1e-3

    def copy_s(self, tokens: int) -> float:
        return 1e-6 * tokens

    def decode_fixed_s(self) -> float:
        return float("inf")  # memory priced out of reach: no room held past chunk_tokens


def test_odma_copies_into_one_run_only_when_the_cost_model_says_it_pays() -> None:
    p = OdmaPolicy(arena(400, real=True), 64, CFG, granule_tokens=1, run_cost=_Cost())
    ar = p.arena
    la = p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))  # [0, 24)
    p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64)))  # [24, 48)
    _fill(p, "a", 9, 24)
    n = 24
    gen = torch.Generator().manual_seed(0)
    want = [torch.randn(n, TINY.num_kv_heads, TINY.head_dim, generator=gen) for _ in range(TINY.num_layers)]
    for layer in range(TINY.num_layers):
        ar.k[layer][la.slots(0, n)] = want[layer]
    res = p.ensure_capacity("a", 25)
    assert res.how == "copied" and res.copied_tokens == n
    new = p.location("a")
    assert new.num_runs == 1 and new.start_slot != 0
    for layer in range(TINY.num_layers):
        assert torch.equal(ar.k[layer][new.slots(0, n)], want[layer])
    assert ar.take_issued_copies() == (n,)
    assert ar.moved_bytes == n * ar.bytes_per_token
    p.check_integrity()


def test_odma_copies_only_into_a_hole_that_holds_the_whole_claim() -> None:
    """Blocked growth where the copy would pay, but the only hole (45 slots, of which b's
    room takes 15) cannot hold the raised claim (40) next to that room: the moved run would
    be lent room and split again, so the request takes a new run instead of a copy. One
    slot more of arena and the claim fits: then it copies."""
    cfg = replace(CFG, elastic=True, chunk_tokens=1, safety_fraction=0.0)

    def grow(cap: int) -> tuple[str, tuple[tuple[int, int], ...]]:
        p = OdmaPolicy(arena(cap, real=True), 64, cfg, granule_tokens=1, run_cost=_Cost())
        p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))  # [0, 9), room to 24
        p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64)))  # [24, 33), room to 48
        _fill(p, "a", 9, 24)
        res = p.ensure_capacity("a", 25)
        assert res.status == GrowStatus.OK
        assert (res.copied_tokens > 0) == (p.copies == 1) == (res.how == "copied")
        p.check_integrity()
        return res.how, p.location("a").runs

    how, runs = grow(78)
    assert how == "new_run" and runs[0] == (0, 24)
    how, runs = grow(88)  # the hole after b's room holds 40
    assert how == "copied" and runs == ((48, 25),)


def test_odma_never_copies_a_request_read_per_block() -> None:
    """The same blocked growth as above, for a request whose KV is read in blocks apart (a
    sliding-window ring): one run would read no faster, so it takes a new run, no copy."""
    p = OdmaPolicy(arena(400, real=True), 64, CFG, granule_tokens=1, run_cost=_Cost())
    p.reserve(replace(rr("a", 8, 64, prediction=pred(CERTAIN, 64)), read_per_block=True))  # [0, 24)
    p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64)))  # [24, 48)
    _fill(p, "a", 9, 24)
    res = p.ensure_capacity("a", 25)
    assert res.status == GrowStatus.OK and res.how == "new_run" and res.copied_tokens == 0
    assert p.location("a").num_runs == 2 and p.location("a").runs[0] == (0, 24)
    assert p.arena.take_issued_copies() == () and p.copies == 0
    p.check_integrity()


def test_odma_holds_nothing_ahead_for_a_request_read_per_block() -> None:
    """Elastic ODMA holds ``chunk_tokens`` past what is live so growth stays in place; a
    request read per block (a ring) gains nothing from that and holds exactly what it needs."""
    cfg = replace(CFG, elastic=True, chunk_tokens=16)
    p = odma(cfg=cfg)
    p.reserve(rr("req", 8, 64, prediction=pred(CERTAIN, 64)))
    p.reserve(replace(rr("ring", 8, 64, prediction=pred(CERTAIN, 64)), read_per_block=True))
    assert p.location("req").capacity_tokens == 8 + 16 and p.location("ring").capacity_tokens == 8
    for n in range(9, 20):
        assert p.ensure_capacity("ring", n).status == GrowStatus.OK
        assert p.location("ring").capacity_tokens == n
    assert p.ensure_capacity("req", 25).status == GrowStatus.OK and p.location("req").capacity_tokens > 25
    p.check_integrity()


def test_odma_no_room_when_nothing_is_free() -> None:
    p = odma(cap=48, cfg=replace(CFG, safety_fraction=0.0))
    p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))  # [0, 24)
    p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64)))  # [24, 48)
    _fill(p, "a", 9, 24)
    assert p.ensure_capacity("a", 25).status == GrowStatus.NO_ROOM
    assert p.location("a").runs == ((0, 24),)
    p.release("b", None)
    assert p.ensure_capacity("a", 25).status == GrowStatus.OK
    p.check_integrity()


def test_odma_granules_hold_whole_pages() -> None:
    p = odma(cap=160, cfg=replace(CFG, elastic=True, chunk_tokens=1, safety_fraction=0.0), granule=16)
    loc = p.reserve(rr("a", 20, 64, prediction=pred(CERTAIN, 64)))
    assert loc.runs == ((0, 32),)  # 21 tokens -> 2 granules of 16
    assert p.reserved_tokens() == 32
    p.check_integrity()


def test_odma_admission_by_the_common_watermark_and_by_claims() -> None:
    p = odma(cap=100, cfg=replace(CFG, safety_fraction=0.0), watermark=0.3)
    assert p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64))) is not None  # 24: 76 free
    assert p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64))) is not None  # 52 free
    assert not p.can_reserve(rr("c", 8, 64, prediction=pred(CERTAIN, 64)))  # 28 < 30 kept free
    q = odma(cap=100, cfg=replace(CFG, safety_fraction=0.0, elastic=True, claim_admission_factor=0.5))
    assert q.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64))) is not None  # claim 24
    assert q.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64))) is not None  # claims 48
    assert q.reserve(rr("c", 8, 64, prediction=pred(CERTAIN, 64))) is None  # 72 > 0.5 x 100
    q.check_integrity()


def test_odma_histogram_reoptimizes_after_reoptimize_every_completions() -> None:
    p = odma(cap=2000)
    edges0 = p.histogram.boundaries.edges_tokens
    for i in range(4):
        p.reserve(rr(f"r{i}", 8, 64, prediction=pred(CERTAIN, 64)))
        p.release(f"r{i}", 20)
    assert p.histogram.num_reoptimizations == 0 and p.histogram.boundaries.edges_tokens == edges0
    p.reserve(rr("r4", 8, 64, prediction=pred(CERTAIN, 64)))
    p.release("r4", 20)
    assert p.histogram.num_reoptimizations == 1
    # all lengths 20 (bin 17..24): an edge at 24, and max_new last
    assert p.histogram.boundaries.edges_tokens == (24, 64)
    assert p.stats().bucket_edges_tokens == (24, 64)
    # preemptions (None) do not feed the histogram
    p.reserve(rr("x", 8, 64, prediction=pred(CERTAIN, 64)))
    p.release("x", None)
    assert len(p.histogram) == 5
    # the new edges drive reservations: at(0.9)=14 -> 24
    assert p.reserve(rr("y", 8, 64, prediction=pred(CERTAIN, 64))).capacity_tokens == 8 + 24


def test_arena_copy_run_overlapping_ranges() -> None:
    ar = arena(32, real=True)
    for layer in range(TINY.num_layers):
        ar.k[layer][:, 0, 0] = torch.arange(32, dtype=torch.float32)
    ar.copy_run(0, 5, 10)  # forward overlap
    assert ar.k[0][5:15, 0, 0].tolist() == list(range(10))
    before = ar.k[1][10:20, 0, 0].clone()
    ar.copy_run(10, 8, 10)  # backward overlap
    assert torch.equal(ar.k[1][8:18, 0, 0], before)
    assert ar.moved_bytes == 20 * ar.bytes_per_token
    assert ar.take_issued_copies() == (10, 10) and ar.take_issued_copies() == ()


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


class _FlatCopy(_Cost):
    """Every run read costs 1 s more than its tokens (so one extra run: +1 s a step), and
    every copy a fixed ``copy`` seconds."""

    def __init__(self, copy: float) -> None:
        self.copy = copy

    def read_run_s(self, tokens: int) -> float:
        return 1.0 + tokens * 1e-3

    def copy_s(self, tokens: int) -> float:
        return self.copy


def test_odma_copy_counts_no_more_remaining_steps_than_the_request_has_lived() -> None:
    """A young request with a large claim: half its remaining claim would make a copy pay,
    but it has generated only a few tokens, and the copy is priced over that many steps."""
    cfg = replace(CFG, elastic=True, chunk_tokens=1, safety_fraction=0.0)
    long_pred = pred([90, 100, 110, 120, 150], 200)  # claim: the whole max_new bucket

    def blocked(copy: float, generated: int) -> str:
        p = OdmaPolicy(arena(1000), 200, cfg, granule_tokens=1, run_cost=_FlatCopy(copy))
        p.reserve(rr("a", 8, 200, prediction=long_pred))
        _fill(p, "a", 9, 8 + generated)
        end = p.location("a").runs[-1][0] + p.location("a").runs[-1][1]
        assert p.main.allocate_at(end, 1) is not None  # something takes the slot right after "a"
        return p.ensure_capacity("a", 9 + generated).how

    # extra read time per step: two runs instead of one, +1 s; half the remaining claim is
    # ~90 steps, so a copy of 30 s would pay on the claim alone.
    assert blocked(30.0, generated=10) == "new_run"  # priced over 10 steps: 10 x ~1 s < 30 s
    assert blocked(30.0, generated=40) == "copied"  # 40 steps: it pays
