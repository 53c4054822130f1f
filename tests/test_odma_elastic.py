"""ODMA elastic slabs: placement, chunked in-place growth, neighbour eviction, compaction,
the admission watermark, and KV contents preserved through every kind of move."""

from __future__ import annotations

import torch

from odma_mlu.config import ModelSpec, OdmaConfig
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.odma import OdmaPolicy
from odma_mlu.kvcache.policy import GrowStatus, ReserveRequest
from odma_mlu.predictor.base import LengthPrediction

SPEC = ModelSpec(name="t", hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
                 intermediate_size=16, vocab_size=32, max_position_embeddings=4096, dtype="float32")
CFG = OdmaConfig(num_buckets=4, safety_fraction=0.0, uncertainty_ratio=100.0, target_coverage=0.9,
                 elastic=True, chunk_tokens=4, admission_watermark_fraction=0.0, compact_min_free_fraction=0.0,
                 overcommit_initial=8.0, overcommit_max=8.0)


def policy(cap: int, cfg: OdmaConfig = CFG, real: bool = False) -> OdmaPolicy:
    arena = KVArena(SPEC, cap, dtype=torch.float32, shape_only=not real)
    return OdmaPolicy(arena, 64, cfg)


def rr(rid: str, prompt: int, predicted: float) -> ReserveRequest:
    pred = LengthPrediction.from_values([predicted] * 5, 64)
    return ReserveRequest(rid, prompt, 64, prompt, pred)


def claim_of(p: OdmaPolicy, prompt: int, predicted: float) -> int:
    return p.initial_tokens(rr("x", prompt, predicted))


def test_holds_live_plus_chunk_at_start_of_smallest_claim_hole() -> None:
    p = policy(200)
    loc = p.reserve(rr("a", 10, 20))
    assert (loc.start_slot, loc.capacity_tokens) == (0, 10 + 4)
    assert p.reserved_tokens() == 14
    # b is placed where a's claim ends, so a can grow in place to its whole claim
    claim_a = claim_of(p, 10, 20)
    assert claim_a == 10 + 32  # bucket edges before any data: 8, 16, 32, 64
    loc_b = p.reserve(rr("b", 6, 20))
    assert loc_b.start_slot == claim_a


def test_grows_in_place_in_chunks_then_evicts_cheaper_neighbour() -> None:
    p = policy(200)
    p.reserve(rr("a", 10, 20))  # [0, 14)
    res = p.ensure_capacity("a", 14)
    assert res.status == GrowStatus.OK and res.how == ""
    p.release("a", None)
    p.reserve(rr("a", 10, 20))  # [0, 14) again
    # b right behind a's chunk (as placement would do when space is tight)
    p.add_slab(rr("b", 2, 20), p.main, p.main.allocate_at(14, 6), claim_of(p, 2, 20))
    for t in range(11, 15):
        assert p.ensure_capacity("a", t).status == GrowStatus.OK
    res = p.ensure_capacity("a", 15)  # a is blocked by b, b holds less KV: b moves
    assert res.status == GrowStatus.OK and res.how == "neighbour_moved" and res.moved_tokens == 2
    assert p.location("a").start_slot == 0 and p.location("a").capacity_tokens >= 15
    assert p.location("b").start_slot != 14
    p.check_integrity()


def test_compaction_opens_a_hole_and_keeps_kv() -> None:
    p = policy(40, real=True)
    arena = p.arena
    # four packed slabs of 10 (placed directly), then holes punched between them
    for i in range(4):
        p.add_slab(rr(f"r{i}", 6, 4), p.main, p.main.allocate_at(10 * i, 10), 10)
    for i in range(4):
        for t in range(7, 11):
            p.ensure_capacity(f"r{i}", t)
    p.release("r0", None)
    p.release("r2", None)
    # mark r1 and r3's written KV
    for rid in ("r1", "r3"):
        start = p.location(rid).start_slot
        for layer in range(SPEC.num_layers):
            arena.k[layer][start:start + 10] = float(int(rid[1:]) + 1)
            arena.v[layer][start:start + 10] = -float(int(rid[1:]) + 1)
    copied = p.compact(20)
    # partial: sliding r1 down already opens [10, 30); r3 is not copied
    assert copied == 10
    assert p.location("r1").start_slot == 0 and p.location("r3").start_slot == 30
    for rid, val in (("r1", 2.0), ("r3", 4.0)):
        start = p.location(rid).start_slot
        for layer in range(SPEC.num_layers):
            assert torch.all(arena.k[layer][start:start + 10] == val)
            assert torch.all(arena.v[layer][start:start + 10] == -val)
    assert p.main.largest_free() == 20
    p.check_integrity()


def test_watermark_holds_back_admission() -> None:
    from dataclasses import replace

    p = policy(100, replace(CFG, admission_watermark_fraction=0.5))
    assert p.reserve(rr("a", 40, 4)) is not None  # 44 used, 56 free >= 50
    assert not p.can_reserve(rr("b", 10, 4))
    assert p.reserve(rr("b", 10, 4)) is None  # would leave 42 < 50 free
    p.release("a", 4)
    assert p.reserve(rr("b", 10, 4)) is not None


def test_overflow_past_claim_raises_it_and_counts() -> None:
    p = policy(400)
    p.reserve(rr("a", 10, 4))
    claim = p._slabs["a"].claim_tokens
    for t in range(11, claim + 3):
        assert p.ensure_capacity("a", t).status == GrowStatus.OK
    assert p.overflowed_requests == 1
    assert p._slabs["a"].claim_tokens > claim
    p.check_integrity()
