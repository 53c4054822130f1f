"""The ODMA v2 policy: regions, claims, placement after the left neighbour's room, growth
in place or into a new run, the copy decision, admission, the bucket histogram, and KV
contents across a copy."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from odma_mlu.config import OdmaConfig
from odma_mlu.kvcache.odma import OdmaPolicy
from odma_mlu.kvcache.policy import GrowStatus
from policy_helpers import TINY, arena, pred, rr


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

    def copy_s(self, tokens: int, num_pending: int = 0) -> float:
        return 1e-6 * tokens

    def decode_fixed_s(self) -> float:
        return float("inf")  # memory priced out of reach: no room held past chunk_tokens

    def view_min_tokens(self) -> int | None:
        return None  # no view rule: ODMA never compacts


def test_odma_copies_into_one_run_only_when_the_cost_model_says_it_pays() -> None:
    p = OdmaPolicy(arena(400, real=True), 64, CFG, granule_tokens=1, run_cost=_Cost())
    ar = p.arena
    la = p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))  # [0, 24)
    # b cannot be moved out of a's way (pinned, as a shared prefix block is): a itself moves
    p.reserve(replace(rr("b", 8, 64, prediction=pred(CERTAIN, 64)), pinned=True))  # [24, 48)
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
    assert ar.take_issued_copies().tokens == (n,)
    for layer in range(TINY.num_layers):
        assert torch.equal(ar.k[layer][new.slots(0, n)], want[layer])
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
        p.reserve(replace(rr("b", 8, 64, prediction=pred(CERTAIN, 64)), pinned=True))  # [24, 33), room to 48; stays
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
    assert p.arena.take_issued_copies().tokens == () and p.copies == 0
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


def test_odma_granule_comes_from_the_config_else_the_page_size() -> None:
    from odma_mlu.config import CacheConfig
    from odma_mlu.kvcache.factory import make_policy

    cache = CacheConfig(page_size_tokens=16, odma=replace(CFG, elastic=True, chunk_tokens=1, safety_fraction=0.0))
    for granule, want in ((None, ((0, 32),)), (4, ((0, 24),)), (1, ((0, 21),))):
        p = make_policy("odma", arena(160), replace(cache, odma=replace(cache.odma, granule_tokens=granule)), 64)
        assert p.reserve(rr("a", 20, 64, prediction=pred(CERTAIN, 64))).runs == want, granule
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



class _FlatCopy(_Cost):
    """Every run read costs 1 s more than its tokens (so one extra run: +1 s a step), and
    every copy a fixed ``copy`` seconds."""

    def __init__(self, copy: float) -> None:
        self.copy = copy

    def read_run_s(self, tokens: int) -> float:
        return 1.0 + tokens * 1e-3

    def copy_s(self, tokens: int, num_pending: int = 0) -> float:
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


def test_odma_integrity_check_catches_an_index_out_of_step_with_the_runs() -> None:
    """The run book's two indexes (odma_runs.py) are rebuilt from the runs and compared:
    each kind of drift is caught, and the untouched book passes."""
    def grown() -> OdmaPolicy:
        p = odma(cfg=replace(CFG, elastic=True, chunk_tokens=4))
        p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))
        p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64)))
        _fill(p, "a", 9, 40)
        p.check_integrity()
        return p

    p = grown()
    end = next(iter(p.book.tail_rooms))
    p.book.tail_rooms[end] += 1
    with pytest.raises(AssertionError, match="tail room index"):
        p.check_integrity()
    p = grown()
    start = next(iter(p.book.owner_at))
    p.book.owner_at[start] = p.book.reqs["b" if p.book.owner_at[start].request_id == "a" else "a"]
    with pytest.raises(AssertionError, match="run owner index"):
        p.check_integrity()
    p = grown()
    p.book.reqs["a"].held_units += 1
    with pytest.raises(AssertionError, match="hold"):
        p.check_integrity()


@pytest.mark.parametrize("watermark, claim_factor", [(0.05, 0.0), (0.0, 0.3)])
def test_a_request_alone_is_admitted_whatever_the_admission_rules(watermark: float, claim_factor: float) -> None:
    """The watermark and admission by claims keep room for running requests' growth. With
    none running they keep room for nobody, and a request that fits the card but not the
    card less the watermark (or whose claim passes the claim budget) would wait forever:
    nothing runs to change the answer."""
    cfg = OdmaConfig(safety_fraction=0.3, claim_admission_factor=claim_factor)
    p = OdmaPolicy(arena(160), 64, cfg, watermark_fraction=watermark, granule_tokens=16)
    loc = p.reserve(rr("big", 150, 8, num_tokens=150))  # a recompute of 150 tokens on 160
    assert loc is not None and loc.capacity_tokens >= 150
    p.check_integrity()
    assert p.reserve(rr("next", 4, 4)) is None  # with one running the rules hold again


class _LongRuns:
    """A device where every run costs a second and memory nearly nothing: the economic run
    length is far longer than the card."""

    def read_run_s(self, tokens: int) -> float:
        return 1.0

    def copy_s(self, tokens: int, num_pending: int = 0) -> float:
        return 1e9

    def decode_fixed_s(self) -> float:
        return 1e-9

    def view_min_tokens(self) -> int | None:
        return None  # no view rule: ODMA never compacts


def test_the_scatter_floor_holds_back_no_request_when_none_is_live() -> None:
    """The floor waits for holes that running requests will free. With none live the main
    and safety regions are all the holes there will be; a request larger than either is
    scattered over both rather than left waiting forever."""
    p = OdmaPolicy(arena(160), 64, OdmaConfig(safety_fraction=0.3), watermark_fraction=0.0, granule_tokens=16,
                   run_cost=_LongRuns())
    for i in range(5):  # completed lengths: the economic run length is known
        assert p.reserve(rr(f"w{i}", 10, 60)) is not None
        p.release(f"w{i}", 60)
    assert p._economic_tokens(130) > 160
    loc = p.reserve(rr("big", 130, 8, num_tokens=130))
    assert loc is not None and len(loc.runs) == 2
    p.check_integrity()
