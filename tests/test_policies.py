"""KV policies: exact sizes and placements per policy, ODMA's growth paths, KV contents across a
migration, randomized integrity, and the scheduler's rejection of impossible requests."""

from __future__ import annotations

from dataclasses import replace

import torch

from odma_mlu.config import ModelSpec, OdmaConfig, load_model_spec
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.odma import OdmaPolicy
from odma_mlu.kvcache.oracle import OraclePolicy
from odma_mlu.kvcache.paged import PagedPolicy
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


# -- static / oracle -----------------------------------------------------------------------
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


def test_oracle_reserves_prompt_plus_true_length() -> None:
    p = OraclePolicy(arena(1000))
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


# -- paged -----------------------------------------------------------------------------------
def test_paged_page_counts_and_block_tables() -> None:
    p = PagedPolicy(arena(64), page_tokens=16)  # 4 pages
    assert p.num_pages == 4 and p.max_request_tokens() == 64
    la = p.reserve(rr("a", 20, 40))
    assert la.block_table == (0, 1) and la.capacity_tokens == 32 and la.page_tokens == 16
    assert la.slot_of(0) == 0 and la.slot_of(17) == 17
    assert p.ensure_capacity("a", 32).status == GrowStatus.OK
    res = p.ensure_capacity("a", 33)
    assert res.status == GrowStatus.OK and res.how == "pages"
    assert p.location("a").block_table == (0, 1, 2)
    lb = p.reserve(rr("b", 16, 10))
    assert lb.block_table == (3,)
    assert p.reserved_tokens() == 64
    assert not p.can_reserve(rr("c", 1, 10))
    assert p.reserve(rr("c", 1, 10)) is None
    assert p.ensure_capacity("a", 48).status == GrowStatus.OK
    assert p.ensure_capacity("a", 49).status == GrowStatus.NO_ROOM
    assert p.location("a").block_table == (0, 1, 2)  # unchanged by the failed grow
    p.check_integrity()
    p.release("b", 1)
    assert p.ensure_capacity("a", 49).status == GrowStatus.OK
    la = p.location("a")
    assert la.block_table == (0, 1, 2, 3)
    assert la.slot_of(48) == 3 * 16 and la.slot_of(20) == 16 + 4
    assert la.slots(30, 4).tolist() == [30, 31, 32, 33]
    p.release("a", 29)
    assert p.reserved_tokens() == 0 and p.num_live() == 0
    p.check_integrity()


# -- odma ------------------------------------------------------------------------------------
# Strict mode (the paper's up-front reservations): exact offsets below assume it.
CFG = OdmaConfig(num_buckets=4, safety_fraction=0.25, uncertainty_ratio=3.0, target_coverage=0.9,
                 reoptimize_every=5, histogram_bin_tokens=8, growth_factor=2.0, elastic=False)
CERTAIN = [10, 12, 14, 15, 20]  # at(0.9) = 14, ratio 2
UNCERTAIN = [5, 10, 20, 30, 40]  # ratio 8


def odma(cap: int = 400, cfg: OdmaConfig = CFG, real: bool = False, max_new: int = 64) -> OdmaPolicy:
    return OdmaPolicy(arena(cap, real), max_new, cfg)


def test_odma_regions_and_prior_buckets() -> None:
    p = odma()
    assert p.regions[0].capacity_tokens == 300 and p.pool is not None and p.pool.capacity_tokens == 100
    assert p.pool.base == 300
    assert p.histogram.boundaries.edges_tokens == (8, 16, 32, 64)
    assert p.max_request_tokens() == 300


def test_odma_bucket_from_prediction_at_target_coverage() -> None:
    p = odma()
    loc = p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))
    assert (loc.start_slot, loc.capacity_tokens) == (0, 8 + 16)
    loc = p.reserve(rr("b", 8, 64, prediction=pred([3, 4, 5, 6, 7], 64)))
    assert (loc.start_slot, loc.capacity_tokens) == (24, 8 + 8)
    loc = p.reserve(rr("c", 8, 64, prediction=pred([20, 25, 40, 50, 55], 64)))  # at(0.9)=40 -> 64
    assert (loc.start_slot, loc.capacity_tokens) == (40, 8 + 64)
    # the bucket never exceeds the request's own max_new_tokens
    loc = p.reserve(rr("d", 8, 20, prediction=pred([17, 17, 18, 19, 20], 20)))
    assert loc.capacity_tokens == 8 + 20
    assert p.safety_pool_reservations == 0 and p.pool.used_tokens == 0
    p.check_integrity()


def test_odma_uncertain_predictions_go_to_the_safety_pool() -> None:
    p = odma()
    loc = p.reserve(rr("u", 8, 64, prediction=pred(UNCERTAIN, 64)))
    # at(0.9) = 20 -> bucket 32, placed at the pool's base
    assert (loc.start_slot, loc.capacity_tokens) == (300, 8 + 32)
    assert p.safety_pool_reservations == 1 and p.pool.used_tokens == 40
    loc = p.reserve(rr("none", 4, 50))  # no prediction at all: uncertain, whole range
    assert (loc.start_slot, loc.capacity_tokens) == (340, 54)
    # pool full: an uncertain request falls back to the main region
    loc = p.reserve(rr("u2", 8, 64, prediction=pred(UNCERTAIN, 64)))
    assert (loc.start_slot, loc.capacity_tokens) == (0, 40)
    assert p.safety_pool_reservations == 2
    p.check_integrity()


def _fill(p: OdmaPolicy, rid: str, t_from: int, t_to: int) -> None:
    for t in range(t_from, t_to + 1):
        assert p.ensure_capacity(rid, t).status == GrowStatus.OK


def test_odma_overflow_grows_in_place_when_neighbour_is_free() -> None:
    p = odma()
    p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))  # [0, 24)
    _fill(p, "a", 9, 24)
    res = p.ensure_capacity("a", 25)
    assert res.status == GrowStatus.OK and res.how == "in_place" and res.moved_tokens == 0
    # new size: prompt + max(bucket(17)=32, 2 * 16) = 40
    assert p.location("a").start_slot == 0 and p.location("a").capacity_tokens == 40
    assert p.in_place_grows == 1 and p.migrations == 0 and p.overflowed_requests == 1
    p.check_integrity()


def test_odma_overflow_moves_when_neighbour_is_used() -> None:
    p = odma()
    p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))  # [0, 24)
    p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64)))  # [24, 48)
    _fill(p, "a", 9, 24)
    res = p.ensure_capacity("a", 25)
    assert res.status == GrowStatus.OK and res.how == "moved"
    assert res.moved_tokens == 24  # the 24 KV slots already written
    assert p.location("a").start_slot == 48 and p.location("a").capacity_tokens == 40
    assert p.migrations == 1 and p.migrated_tokens == 24
    assert p.arena.moved_bytes == 24 * p.arena.bytes_per_token
    # the old slot range is free again and reused
    loc = p.reserve(rr("c", 8, 64, prediction=pred(CERTAIN, 64)))
    assert loc.start_slot == 0
    p.check_integrity()


def test_odma_overflow_goes_to_the_safety_pool_when_main_is_full() -> None:
    p = odma()
    for i in range(12):  # 12 x 24 = 288 of 300 main tokens
        assert p.reserve(rr(f"r{i}", 8, 64, prediction=pred(CERTAIN, 64))).start_slot == 24 * i
    _fill(p, "r0", 9, 24)
    res = p.ensure_capacity("r0", 25)
    assert res.status == GrowStatus.OK and res.how == "safety_pool" and res.moved_tokens == 24
    assert p.location("r0").start_slot == 300 and p.location("r0").capacity_tokens == 40
    assert p.pool.used_tokens == 40
    # later growth of a request in the pool stays there (in place)
    _fill(p, "r0", 26, 40)
    res = p.ensure_capacity("r0", 41)
    assert res.status == GrowStatus.OK and res.how == "in_place"
    assert p.location("r0").start_slot == 300
    p.check_integrity()


def test_odma_no_room_when_nothing_fits() -> None:
    cfg = replace(CFG, safety_fraction=0.0)
    p = odma(cap=58, cfg=cfg)
    p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))  # [0, 24)
    assert p.reserve(rr("b", 2, 64, prediction=pred([3, 4, 5, 6, 7], 64))).start_slot == 24  # [24, 34)
    assert p.reserve(rr("c", 8, 64, prediction=pred(CERTAIN, 64))).start_slot == 34  # [34, 58)
    _fill(p, "a", 9, 24)
    res = p.ensure_capacity("a", 25)
    assert res.status == GrowStatus.NO_ROOM
    assert p.location("a").capacity_tokens == 24 and p.migrations == 0 and p.in_place_grows == 0
    p.check_integrity()
    p.release("b", None)  # a hole of 10 to a's right: too small for the raised claim of 40
    assert p.ensure_capacity("a", 25).status == GrowStatus.NO_ROOM
    p.release("c", None)  # now 34 free to a's right
    res = p.ensure_capacity("a", 25)
    assert res.status == GrowStatus.OK and res.how == "in_place" and p.location("a").capacity_tokens == 40
    p.check_integrity()


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


def test_odma_move_preserves_kv_contents() -> None:
    p = odma(cap=400, real=True)
    ar = p.arena
    la = p.reserve(rr("a", 8, 64, prediction=pred(CERTAIN, 64)))
    p.reserve(rr("b", 8, 64, prediction=pred(CERTAIN, 64)))
    lb = p.location("b")
    _fill(p, "a", 9, 24)
    n = 24  # KV written for tokens 0..23 of a
    gen = torch.Generator().manual_seed(0)
    want_k = [torch.randn(n, TINY.num_kv_heads, TINY.head_dim, generator=gen) for _ in range(TINY.num_layers)]
    want_v = [torch.randn(n, TINY.num_kv_heads, TINY.head_dim, generator=gen) for _ in range(TINY.num_layers)]
    b_k = torch.full((lb.capacity_tokens, TINY.num_kv_heads, TINY.head_dim), 7.0)
    for layer in range(TINY.num_layers):
        ar.k[layer][la.slots(0, n)] = want_k[layer]
        ar.v[layer][la.slots(0, n)] = want_v[layer]
        ar.k[layer][lb.slots(0, lb.capacity_tokens)] = b_k
    res = p.ensure_capacity("a", 25)
    assert res.how == "moved" and res.moved_tokens == n
    new = p.location("a")
    assert new.start_slot != la.start_slot
    for layer in range(TINY.num_layers):
        assert torch.equal(ar.k[layer][new.slots(0, n)], want_k[layer])
        assert torch.equal(ar.v[layer][new.slots(0, n)], want_v[layer])
        assert torch.equal(ar.k[layer][lb.slots(0, lb.capacity_tokens)], b_k)  # neighbour untouched
    assert ar.moved_bytes == n * ar.bytes_per_token
    # a second move (to the safety pool) keeps them too
    for i in range(20):
        if p.reserve(rr(f"f{i}", 8, 64, prediction=pred(CERTAIN, 64))) is None:
            break
    _fill(p, "a", 26, 40)
    res = p.ensure_capacity("a", 41)
    assert res.status == GrowStatus.OK
    if res.how != "in_place":
        new = p.location("a")
    for layer in range(TINY.num_layers):
        assert torch.equal(ar.k[layer][new.slots(0, n)], want_k[layer])
        assert torch.equal(ar.v[layer][new.slots(0, n)], want_v[layer])
    p.check_integrity()


def test_arena_move_overlapping_ranges() -> None:
    ar = arena(32, real=True)
    for layer in range(TINY.num_layers):
        ar.k[layer][:, 0, 0] = torch.arange(32, dtype=torch.float32)
    ar.move(range(0, 10), range(5, 15))  # forward overlap
    assert ar.k[0][5:15, 0, 0].tolist() == list(range(10))
    before = ar.k[1][10:20, 0, 0].clone()
    ar.move(range(10, 20), range(8, 18))  # backward overlap
    assert torch.equal(ar.k[1][8:18, 0, 0], before)
    assert ar.moved_bytes == 20 * ar.bytes_per_token


def test_7b_spec_shape_only_arena() -> None:
    spec = load_model_spec()
    a = KVArena(spec, 100_000, shape_only=True)
    assert a.k == [] and a.bytes_per_token == spec.kv_bytes_per_token
    p = StaticPolicy(a)
    assert p.reserve(rr("a", 100, 512)).capacity_tokens == 612
