"""The ring pool (odma_mlu/kvcache/window.py) on its own, shape only: rings start at the
prompt, grow in place to the window and stop; placement leaves room for growth; blocked
growth takes a second run, then fails; held-slot accounting and integrity under random
operations; WindowedPolicy turns a blocked ring into NO_ROOM."""

from __future__ import annotations

import random

import torch

from odma_mlu.kvcache.window import RingPool, WindowedPolicy, split_kv_budget

WINDOW = 32


def _pool(windows: int = 4, granule: int = 8, max_runs: int = 2) -> RingPool:
    return RingPool(2, WINDOW, windows, 2, 4, shape_only=True, granule_tokens=granule, max_runs=max_runs)


def test_ring_starts_at_the_prompt_grows_in_place_and_stops_at_the_window() -> None:
    pool = _pool()
    assert pool.allocate("a", 5)
    assert pool.runs_of("a") == ((0, 8),) and pool.stats().held_slots == 8
    held = []
    for tokens in range(6, 100):
        assert pool.ensure("a", tokens)
        held.append(pool.stats().held_slots)
        assert len(pool.runs_of("a")) == 1
        pool.check_integrity()
    assert held[:4] == [8, 8, 8, 16] and max(held) == WINDOW == held[-1]
    stats = pool.stats()
    assert stats.live_tokens == WINDOW and stats.evicted_tokens == 99 - WINDOW
    assert stats.held_bytes == WINDOW * pool.bytes_per_token and pool.in_place_grows == 3
    assert pool.read_runs("a", 10) == (10,) and pool.read_runs("a", 99) == (WINDOW,)
    pool.free("a")
    assert pool.stats().held_slots == 0 and pool.stats().num_rings == 0
    pool.check_integrity()


def test_placement_leaves_room_for_the_left_ring_to_grow() -> None:
    pool = _pool()
    assert pool.allocate("a", 3, room_tokens=24)  # 8 slots now, room for 24
    assert pool.allocate("b", 3, room_tokens=24)
    (start_b, _), = pool.runs_of("b")
    assert start_b >= 24, f"b placed at {start_b}, inside a's room"
    assert pool.ensure("a", 24) and pool.runs_of("a") == ((0, 24),)
    assert pool.second_runs == 0


def test_blocked_growth_takes_a_second_run_then_fails() -> None:
    pool = _pool(windows=2)  # 64 slots
    assert pool.allocate("a", 3, room_tokens=1) and pool.allocate("b", 3, room_tokens=1)
    assert pool.runs_of("a") == ((0, 8),) and pool.runs_of("b") == ((8, 8),)  # packed: no room left
    assert pool.ensure("a", 12)
    assert len(pool.runs_of("a")) == 2 and pool.second_runs == 1
    assert pool.read_runs("a", 12) == (8, 4) and pool.read_runs("a", 14) == (8, 6)
    assert pool.runs_of("a")[1] == (16, 8)
    assert pool.allocate("c", WINDOW) and pool.runs_of("c") == ((32, WINDOW),)  # at the end: a may grow
    pool.check_integrity()
    blocked_before = pool.blocked_grows
    grew = pool.ensure("b", WINDOW)
    assert not grew and pool.blocked_grows == blocked_before + 1  # 8 free slots: b needs 24 more
    assert pool.runs_of("b") == ((8, 8),)  # a failed growth changes nothing
    pool.check_integrity()
    pool.free("c")
    assert pool.ensure("b", WINDOW) and pool.runs_of("b") == ((8, 8), (40, 24))  # past a's room
    assert pool.ensure("a", WINDOW) and pool.runs_of("a") == ((0, 8), (16, 24))  # a grew in place
    assert sum(n for _, n in pool.runs_of("a")) == WINDOW == sum(n for _, n in pool.runs_of("b"))
    pool.check_integrity()


def test_random_operations_keep_the_pool_consistent() -> None:
    rng = random.Random(3)
    pool = _pool(windows=6, granule=4)
    tokens: dict[str, int] = {}
    for step in range(3000):  # noqa: B007
        rid = f"r{rng.randrange(20)}"
        if rid not in tokens:
            n = rng.randrange(1, 50)
            if pool.allocate(rid, n, rng.choice([None, 1, n + rng.randrange(40)])):
                tokens[rid] = n
        elif rng.random() < 0.08:
            pool.free(rid)
            del tokens[rid]
        else:
            tokens[rid] += rng.randrange(1, 6)
            if not pool.ensure(rid, tokens[rid]):
                pool.free(rid)  # what preemption does
                del tokens[rid]
        if step % 13 == 0:
            pool.check_integrity()
            stats = pool.stats()
            assert stats.held_slots == sum(sum(n for _, n in pool.runs_of(r)) for r in tokens)
            assert stats.live_tokens == sum(min(t, WINDOW) for t in tokens.values())
            assert all(len(pool.runs_of(r)) <= 2 for r in tokens)
    assert pool.second_runs > 0 and pool.in_place_grows > 0 and pool.blocked_grows > 0


class _Inner:
    """A stand-in full-attention policy: always room."""

    watermark_tokens, capacity_tokens = 0, 1000

    def __init__(self) -> None:
        self.live: set[str] = set()

    def reserve(self, req):  # noqa: ANN001, ANN201
        self.live.add(req.request_id)
        return "loc"

    def ensure_capacity(self, request_id: str, needed_tokens: int):  # noqa: ANN201
        from odma_mlu.kvcache.policy import GrowResult, GrowStatus

        return GrowResult(GrowStatus.OK)

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.live.discard(request_id)


def test_windowed_policy_reports_no_room_when_a_ring_cannot_grow() -> None:
    from odma_mlu.kvcache.policy import GrowStatus, ReserveRequest

    pool = _pool(windows=1, granule=8)  # 32 slots
    policy = WindowedPolicy(_Inner(), pool)
    for rid in "abcd":
        assert policy.reserve(ReserveRequest(rid, 3, 100, 3)) == "loc"
    assert policy.reserve(ReserveRequest("e", 3, 100, 3)) is None  # no ring room: it waits
    assert policy.ensure_capacity("a", 9).status == GrowStatus.NO_ROOM
    policy.release("d", None)
    assert policy.ensure_capacity("a", 9).status == GrowStatus.OK
    assert not pool.holds("d") and pool.stats().num_rings == 3


def test_split_gives_each_group_as_many_tokens() -> None:
    split = split_kv_budget(1000 * 6 * 10, 1 * 10, 5 * 10, WINDOW, max_num_seqs=64)
    assert split.ring_slots == split.arena_tokens == 1000
    capped = split_kv_budget(1000 * 6 * 10, 10, 50, WINDOW, max_num_seqs=4)
    assert capped.ring_slots == 4 * WINDOW and capped.arena_tokens == (60000 - 4 * WINDOW * 50) // 10
    assert torch.tensor(split.ring_bytes) == split.ring_slots * 50
