"""Rings inside the arena (odma_mlu/kvcache/window.py), shape only: the flat-lane layout of
ring blocks (cells packed over the lanes, no padding where F does not divide S), its mapping
through any location the policy gives, WindowedPolicy
reserving / growing / releasing each ring as a second request of the inner policy, sizes
under the policies that size at admission, blocked rings as NO_ROOM, and integrity under
random operations."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from odma_mlu.config import CacheConfig, ModelSpec
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.arena import KVArena, KVLocation
from odma_mlu.kvcache.factory import POLICY_NAMES, make_policy
from odma_mlu.kvcache.policy import GrowStatus, ReserveRequest
from odma_mlu.kvcache.window import RingPool, flat_groups_for, ring_id
from odma_mlu.kvcache.windowed import WindowedPolicy
from odma_mlu.predictor.base import LengthPrediction

WINDOW = 32
SPEC = ModelSpec(name="lanes", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 intermediate_size=64, vocab_size=100, max_position_embeddings=4096)
"""An arena of 2 full layers (lanes)."""


def _arena(slots: int = 4096) -> KVArena:
    return KVArena(SPEC, slots, shape_only=True)


def _windowed(policy: str = "paged", slots: int = 4096, sliding: int = 5, block: int = 8, page: int = 4,
              max_new: int = 64) -> WindowedPolicy:
    arena = _arena(slots)
    cache = replace(CacheConfig(), page_size_tokens=page, watermark_fraction=0.0)
    return WindowedPolicy(make_policy(policy, arena, cache, max_new), RingPool(arena, sliding, WINDOW, block))


def _brute_runs(pool: RingPool, loc: KVLocation, layer: int, slots: int) -> tuple[tuple[int, int], ...]:
    """Sliding layer ``layer``'s runs of ring indices [0, slots), slot by slot, from the
    definition: block b of layer j is cell q = b S + j, in lane q % F at row-block q // F."""
    out: list[list[int]] = []
    b, s, f = pool.block_tokens, pool.num_layers, pool.num_lanes
    for i in range(slots):
        q = (i // b) * s + layer
        flat = (q % f) * pool.capacity_slots + loc.slot_of((q // f) * b + i % b)
        if out and out[-1][0] + out[-1][1] == flat:
            out[-1][1] += 1
        else:
            out.append([flat, 1])
    return tuple((a, n) for a, n in out)


def _fixed(pool: RingPool, runs: tuple[tuple[int, int], ...]) -> None:
    """Ring "a" at a location of ``runs``, whatever a policy would give."""

    class Fixed:
        def location(self, rid: str) -> KVLocation:
            assert rid == ring_id("a")
            return KVLocation(runs)

    pool.policy = Fixed()
    pool.admit("a", 1)


def test_layout_of_cells_over_the_lanes() -> None:
    """window 8, B 2, F 2, S 3 (the module's diagram): cell q = 3 b + j in lane q % 2 at
    row-block q // 2; whole rings take ceil(n S / F) row-blocks, no padding."""
    pool = RingPool(_arena(), 3, 8, 2)
    assert (pool.num_lanes, pool.num_layers, pool.block_tokens) == (2, 3, 2)
    lanes = [[None] * 6 for _ in range(2)]
    for j in range(3):
        for blk in range(4):
            lane, rb = pool.cell(j, blk)
            assert lanes[lane][rb] is None, "two blocks in one cell"
            lanes[lane][rb] = f"L{j}.b{blk}"
    assert lanes == [["L0.b0", "L2.b0", "L1.b1", "L0.b2", "L2.b2", "L1.b3"],
                     ["L1.b0", "L0.b1", "L2.b1", "L1.b2", "L0.b3", "L2.b3"]]
    assert [pool.ring_row(0, i) for i in range(8)] == [0, 1, 2, 3, 6, 7, 8, 9]
    assert [pool.ring_row(2, i) for i in range(8)] == [2, 3, 4, 5, 8, 9, 10, 11]
    assert [pool.rows_for(t) for t in (1, 2, 3, 5, 6, 7, 100)] == [4, 4, 6, 10, 10, 12, 12]
    # 5 sliding over 2 lanes, B 16: 2.5 row-blocks a block, not 3 groups of blocks (G F = 6 lane-layers for 5)
    five = RingPool(_arena(), 5, WINDOW, 16)
    assert five.rows_for(1) == 48 and five.rows_for(17) == five.rows_for(99) == 80
    odd = RingPool(_arena(), 2, 18, 4)  # a window that is no multiple of the block: a partial last block
    assert odd.ring_slots_for(17) == 18 and odd.rows_for(18) == 4 * 5


def test_shapes_must_match_and_full_layers_must_exist() -> None:
    with pytest.raises(ConfigError, match="cannot share the arena"):
        RingPool(_arena(), 3, WINDOW, num_kv_heads=4, head_dim=8)
    with pytest.raises(ConfigError, match="sliding window of 0 tokens"):
        RingPool(_arena(), 3, 0)
    with pytest.raises(ConfigError, match="ring block of 0 tokens"):
        RingPool(_arena(), 3, WINDOW, 0)
    with pytest.raises(ConfigError, match="every attention layer slides"):
        RingPool(KVArena(replace(SPEC, num_layers=0), 16, shape_only=True), 3, WINDOW)


def test_no_padding_at_scale() -> None:
    """qwen2-7b-swa's shape, 20 sliding over 8 lanes, a whole 1024 window in blocks of 16:
    64 blocks x 20 layers = 1280 cells = 160 row-blocks of 8 lanes, every cell used."""
    lanes8 = KVArena(replace(SPEC, num_layers=8), 1 << 16, shape_only=True)
    pool = RingPool(lanes8, 20, 1024, 16)
    assert pool.rows_for(1024) == 160 * 16 == 1024 * 20 // 8
    used = {pool.cell(j, blk) for j in range(20) for blk in range(64)}
    assert len(used) == 64 * 20 and used == {(lane, rb) for lane in range(8) for rb in range(160)}


def test_docstring_example_under_pages() -> None:
    """The module docstring's paged example: location runs ((96, 4), (24, 8))."""
    pool = RingPool(_arena(), 3, 8, 2)
    _fixed(pool, ((96, 4), (24, 8)))
    pool.note_tokens("a", 8)
    c = pool.capacity_slots
    assert pool.runs_of("a", 0) == ((96, 2), (c + 98, 2), (26, 2), (c + 28, 2))
    assert pool.read_runs("a", 5) == (2, 2, 1)


@pytest.mark.parametrize("sliding", [3, 4, 5])
@pytest.mark.parametrize("runs", [((0, 200),), ((100, 7), (40, 9), (300, 50), (7, 30), (600, 200)),
                                  tuple((i * 8, 4) for i in range(60, 0, -1))])
def test_layer_runs_follow_the_location(sliding: int, runs: tuple[tuple[int, int], ...]) -> None:
    """Whatever runs the ring's location has, each sliding layer's runs (and the flat slots
    the forward gathers) are its ring indices' slots by the definition."""
    import torch

    pool = _windowed(sliding=sliding).rings
    _fixed(pool, runs)
    for tokens in (1, 5, 9, 17, 31, 32, 70):
        pool.note_tokens("a", tokens)
        c = pool.ring_slots_for(tokens)
        flat = pool.flat_slots(KVLocation(runs), torch.arange(c)).tolist()
        seen: set[int] = set()
        for j in range(sliding):
            brute = _brute_runs(pool, KVLocation(runs), j, c)
            assert pool.runs_of("a", j) == brute
            assert [s + i for s, n in brute for i in range(n)] == flat[j]
            seen.update(flat[j])
        assert len(seen) == sliding * c, "two ring entries share a flat slot"
        assert pool.read_runs("a", tokens) == tuple(
            n for n in _covering([n for _, n in pool.runs_of("a", 0)], min(tokens, WINDOW)))


def _covering(lengths: list[int], tokens: int) -> list[int]:
    out = []
    for n in lengths:
        if tokens <= 0:
            break
        out.append(min(n, tokens))
        tokens -= n
    return out


def test_ring_is_a_second_request_that_grows_to_the_window() -> None:
    windowed = _windowed("paged")
    pool, inner = windowed.rings, windowed.inner
    req = ReserveRequest("a", 5, 100, 5)
    assert windowed.can_reserve(req) and windowed.reserve(req) is not None
    assert windowed.num_live() == 1 and inner.num_live() == 2
    assert windowed.location(ring_id("a")).capacity_tokens == pool.rows_for(5) == 3 * 8
    held = []
    for tokens in range(6, 100):
        res = windowed.ensure_capacity("a", tokens)
        assert res.status == GrowStatus.OK
        held.append(pool.stats().held_slots)
        windowed.check_integrity()
    assert held[0] == 24 and held[-1] == pool.rows_for(WINDOW) == 5 * WINDOW // 2 == max(held)  # 4 blocks: 10 row-blocks
    stats = pool.stats()
    assert stats.num_rings == 1 and stats.live_tokens == WINDOW and stats.evicted_tokens == 99 - WINDOW
    assert stats.held_bytes == stats.held_slots * pool.bytes_per_slot
    assert inner.reserved_tokens() == inner.location("a").capacity_tokens + stats.held_slots
    assert windowed.live_ring_rows() == pool.rows_for(99)
    windowed.release("a", 94)
    assert windowed.num_live() == 0 and inner.num_live() == 0 and inner.reserved_tokens() == 0
    assert pool.stats().num_rings == 0 and not pool.holds("a")
    windowed.check_integrity()


@pytest.mark.parametrize("policy", ["static", "exact", "s3"])
def test_policies_that_size_at_admission_give_the_ring_its_whole_size(policy: str) -> None:
    windowed = _windowed(policy, max_new=64)
    pool, inner = windowed.rings, windowed.inner
    pred = LengthPrediction.from_values([4, 6, 8, 10, 12], 64)
    for rid, prompt, true_len in (("short", 3, 5), ("long", 20, 60)):
        req = ReserveRequest(rid, prompt, 64, prompt, pred, true_len)
        run = inner.initial_tokens(req)
        assert windowed.reserve(req) is not None
        assert windowed.location(ring_id(rid)).capacity_tokens == pool.rows_for(min(run, WINDOW))
        for tokens in range(prompt + 1, run + 1):  # the ring never needs more than admission gave it
            res = windowed.ensure_capacity(rid, tokens)
            assert res.status == GrowStatus.OK and not res.how
        windowed.check_integrity()
    windowed.release("short", 5)
    windowed.release("long", None)
    assert inner.num_live() == 0 and inner.reserved_tokens() == 0


def test_ring_release_does_not_teach_odma_lengths() -> None:
    windowed = _windowed("odma")
    observed: list[int] = []
    hist = windowed.inner.histogram
    real = hist.observe
    hist.observe = lambda n: observed.append(n) or real(n)  # type: ignore[method-assign]
    assert windowed.reserve(ReserveRequest("a", 5, 64, 5)) is not None
    windowed.release("a", 17)
    assert observed == [17]


def test_blocked_ring_growth_is_no_room_and_release_frees_both() -> None:
    # 144 slots, pages of 8: each request holds a page, each ring ceil(5 / 2) row-blocks of 8 rows at first
    windowed = _windowed("paged", slots=144, page=8, block=8)
    pool = windowed.rings
    for rid in "abcd":
        assert windowed.reserve(ReserveRequest(rid, 3, 100, 3)) is not None
    assert windowed.inner.free_tokens() == 144 - 4 * (8 + 24) == 16
    assert windowed.reserve(ReserveRequest("e", 3, 100, 3)) is None  # no room for its ring: it waits
    assert windowed.inner.num_live() == 8 and windowed.inner.free_tokens() == 16, "a failed admission leaves nothing"
    assert windowed.ensure_capacity("a", 8).status == GrowStatus.OK  # within its page and its ring's first block
    res = windowed.ensure_capacity("a", 9)  # a second page (8 rows) fits, its ring's second block (2 blocks
    # = 10 cells = 5 row-blocks: 16 more rows) does not
    assert res.status == GrowStatus.NO_ROOM and pool.blocked_grows == 1
    assert res.how == "pages", "the request's runs changed: the scheduler must drop its cached location"
    windowed.check_integrity()
    windowed.release("d", None)
    res = windowed.ensure_capacity("a", 9)
    assert res.status == GrowStatus.OK and res.how == "pages"
    assert pool.stats().held_slots == 2 * 24 + 40 and not pool.holds("d") and pool.stats().num_rings == 3
    windowed.check_integrity()


def test_integrity_checks_the_ring_requests() -> None:
    windowed = _windowed("paged")
    assert windowed.reserve(ReserveRequest("a", 5, 64, 5)) is not None
    windowed.check_integrity()
    windowed.inner.release(ring_id("a"), None)  # a request without its ring
    with pytest.raises((AssertionError, KeyError)):
        windowed.check_integrity()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_random_operations_keep_policy_and_rings_consistent(policy: str) -> None:
    rng = random.Random(3)
    windowed = _windowed(policy, slots=1200, max_new=64)
    pool = windowed.rings
    tokens: dict[str, tuple[int, int]] = {}  # rid -> (prompt, tokens)
    grown = 0
    for step in range(1500):
        rid = f"r{rng.randrange(20)}"
        if rid not in tokens:
            n = rng.randrange(1, 50)
            if windowed.reserve(ReserveRequest(rid, n, 64, n, None, rng.randrange(1, 65))) is not None:
                tokens[rid] = (n, n)
        elif rng.random() < 0.08:
            windowed.release(rid, rng.choice([None, 7]))
            del tokens[rid]
        else:
            prompt, n = tokens[rid]
            n = min(prompt + 64, n + rng.randrange(1, 6))
            res = windowed.ensure_capacity(rid, n)
            if res.status == GrowStatus.OK:
                tokens[rid] = (prompt, n)
                grown += 1
            else:
                windowed.release(rid, None)  # what preemption does
                del tokens[rid]
        if step % 13 == 0:
            windowed.check_integrity()
            assert windowed.num_live() == len(tokens) and windowed.inner.num_live() == 2 * len(tokens)
            # every ring entry of every layer has its own flat slot, inside its ring's rows, and no
            # ring entry lies on a slot a request's KV (every lane of its slots) or another ring holds
            cap, taken = pool.capacity_slots, set()
            for rid in tokens:
                for s, k in windowed.location(rid).runs:
                    taken.update(lane * cap + s + i for lane in range(pool.num_lanes) for i in range(k))
            for rid, (_, n) in tokens.items():
                c = pool.ring_slots_for(n)
                rows = {s + i for s, k in windowed.location(ring_id(rid)).runs for i in range(k)}
                flat = {s + i for j in range(pool.num_layers) for s, k in pool.runs_of(rid, j) for i in range(k)}
                assert all(sum(k for _, k in pool.runs_of(rid, j)) == c for j in range(pool.num_layers))
                assert len(flat) == pool.num_layers * c, f"{rid}: two ring entries share a slot"
                assert {f % cap for f in flat} <= rows, f"{rid}: a ring entry outside its ring's rows"
                assert not flat & taken, f"{rid}: a ring entry on another request's or ring's slot"
                taken |= flat
    assert grown > 0
    if policy == "odma":  # a fragmented arena: some ring's next block went into several holes
        assert pool.stepped_grows > 0
    for rid in list(tokens):
        windowed.release(rid, None)
    assert windowed.inner.reserved_tokens() == 0 and windowed.num_live() == 0


def test_flat_arena_lanes_are_views_of_one_tensor() -> None:
    """KVArena(flat_groups=1): k[layer] is rows [layer * C, (layer + 1) * C) of the flat
    tensor, so a ring entry written through the flat tensor is what the full layer's tensor
    holds there, and copy_run (per lane, as ever) moves ring entries of every lane with their rows."""
    import torch

    arena = KVArena(SPEC, 32, dtype=torch.float32, flat_groups=1)
    (k_flat,), (v_flat,) = arena.k_groups, arena.v_groups
    assert k_flat.shape == (2 * 32, SPEC.num_kv_heads, SPEC.head_dim)
    k_flat[32 + 5] = 7.0  # lane 1, slot 5
    assert float(arena.k[1][5].mean()) == 7.0 and float(arena.k[0][5].abs().sum()) == 0.0
    arena.v[0][3] = 2.0
    assert float(v_flat[3].mean()) == 2.0
    arena.copy_run(3, 20, 4)  # slots 3..6 -> 20..23 in every lane
    arena.take_issued_copies()  # run the batch
    assert float(k_flat[32 + 22].mean()) == 7.0 and float(v_flat[20].mean()) == 2.0
    assert KVArena(SPEC, 32, dtype=torch.float32).k_groups == ()


def test_lane_groups_split_the_flat_tensor() -> None:
    """Two lane groups: layers 0-1 in one flat tensor, 2-3 in the other, each layer a view."""
    import torch

    arena = KVArena(replace(SPEC, num_layers=4), 16, dtype=torch.float32, flat_groups=2)
    assert len(arena.k_groups) == 2 and arena.k_groups[0].shape[0] == 2 * 16
    arena.k_groups[1][16 + 3] = 5.0  # group 1, its lane 1 = layer 3, slot 3
    assert float(arena.k[3][3].mean()) == 5.0 and float(arena.k[1][3].abs().sum()) == 0.0
    with pytest.raises(AssertionError, match="equal flat groups"):
        KVArena(replace(SPEC, num_layers=3), 16, flat_groups=2)


def test_flat_groups_keep_tensors_under_the_cap() -> None:
    """The fewest groups that divide F and S and keep each tensor within the cap; a one-line
    error naming kv_capacity_tokens when even the most groups cannot."""
    assert flat_groups_for(8, 20, 1000, 1024, max_tensor_bytes=8 * 1000 * 1024) == 1
    assert flat_groups_for(8, 20, 1000, 1024, max_tensor_bytes=8 * 1000 * 1024 - 1) == 2
    assert flat_groups_for(8, 20, 1000, 1024, max_tensor_bytes=2 * 1000 * 1024) == 4  # gcd(8, 20) = 4
    with pytest.raises(ConfigError, match=r"kv_capacity_tokens: .* 4 lane groups .* at most 999 slots fit"):
        flat_groups_for(8, 20, 1000, 1024, max_tensor_bytes=2 * 999 * 1024)
    # The 7B-shaped qwen2-7b-swa on one MLU370-X4 (8 full + 20 sliding, fp16, 6.3 GiB of KV):
    # one flat K tensor would be ~3.2 GiB, so two groups.
    slots = 117971 * 28 // 8
    assert flat_groups_for(8, 20, slots, 4 * 128 * 2) == 2
