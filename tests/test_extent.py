"""ExtentAllocator: exact placement, coalescing, in-place growth, shrink, fragmentation, and a
randomized state machine checked against a byte-per-slot reference model."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from odma_mlu.kvcache.extent import Extent, ExtentAllocator


def _free_map(a: ExtentAllocator) -> list[tuple[int, int]]:
    """(start, length) of every free extent, by address."""
    used = a.used_extents()
    out, pos = [], a.base
    for e in used:
        if e.start > pos:
            out.append((pos, e.start - pos))
        pos = e.end
    if pos < a.base + a.capacity_tokens:
        out.append((pos, a.base + a.capacity_tokens - pos))
    return out


def test_sequential_allocation_is_address_ordered() -> None:
    a = ExtentAllocator(100)
    assert [a.allocate(n) for n in (10, 20, 30, 5)] == [Extent(0, 10), Extent(10, 20), Extent(30, 30), Extent(60, 5)]
    assert a.used_tokens == 65 and a.free_tokens == 35 and a.num_used == 4
    assert _free_map(a) == [(65, 35)]
    a.check_integrity()


def test_best_fit_takes_the_smallest_hole() -> None:
    a = ExtentAllocator(100)
    x = [a.allocate(n) for n in (10, 20, 5, 8, 30)]  # 0,10,30,35,43 ; free 73..100 (27)
    a.free(x[1])  # hole (10, 20)
    a.free(x[3])  # hole (35, 8)
    assert _free_map(a) == [(10, 20), (35, 8), (73, 27)]
    assert a.allocate(7) == Extent(35, 7)  # 8 is the smallest hole >= 7
    assert a.allocate(15) == Extent(10, 15)  # 20 < 27
    assert a.allocate(21) == Extent(73, 21)  # only the tail fits
    assert a.allocate(7) is None  # holes left: (25,5) (42,1) (94,6)
    assert a.allocate(6) == Extent(94, 6)
    assert _free_map(a) == [(25, 5), (42, 1)]
    a.check_integrity()


def test_best_fit_ties_go_to_the_lowest_address() -> None:
    a = ExtentAllocator(100)
    xs = [a.allocate(10) for _ in range(10)]
    for i in (6, 1, 3):
        a.free(xs[i])
    assert a.allocate(10) == Extent(10, 10)
    assert a.allocate(4) == Extent(30, 4)
    # holes now (34, 6) and (60, 10): 6 is the best fit for 5
    assert a.allocate(5) == Extent(34, 5)
    assert a.allocate(10) == Extent(60, 10)
    assert a.allocate(1) == Extent(39, 1)
    assert a.allocate(1) is None
    a.check_integrity()


def test_coalescing_left_right_and_both() -> None:
    a = ExtentAllocator(50)
    e = [a.allocate(10) for _ in range(5)]
    a.free(e[1])
    a.free(e[2])  # coalesces with its left neighbour
    assert _free_map(a) == [(10, 20)]
    a.free(e[4])
    a.free(e[3])  # coalesces with its right neighbour (and the left run)
    assert _free_map(a) == [(10, 40)]
    a.check_integrity()

    b = ExtentAllocator(30)
    f = [b.allocate(10) for _ in range(3)]
    b.free(f[0])
    b.free(f[2])
    assert _free_map(b) == [(0, 10), (20, 10)]
    b.free(f[1])  # both sides
    assert _free_map(b) == [(0, 30)]
    assert b.fragmentation().num_free_extents == 1
    assert b.allocate(30) == Extent(0, 30)
    b.check_integrity()


def test_right_only_coalescing() -> None:
    a = ExtentAllocator(30)
    f = [a.allocate(10) for _ in range(3)]
    a.free(f[2])
    a.free(f[1])
    assert _free_map(a) == [(10, 20)]
    assert a.fragmentation().num_free_extents == 1
    a.check_integrity()


def test_grow_in_place_when_right_neighbour_is_free() -> None:
    a = ExtentAllocator(100)
    x = a.allocate(10)
    y = a.allocate(10)
    a.free(y)  # x's right neighbour is free: 10..100
    assert a.can_grow_in_place(x, 40)
    g = a.grow_in_place(x, 40)
    assert g == Extent(0, 40)
    assert a.used_tokens == 40 and _free_map(a) == [(40, 60)]
    assert a.grow_in_place(g, 100) == Extent(0, 100)  # exactly the whole neighbour
    assert a.free_tokens == 0 and a.fragmentation().num_free_extents == 0
    a.check_integrity()


def test_grow_in_place_refuses_when_neighbour_is_used_or_too_small() -> None:
    a = ExtentAllocator(100)
    x = a.allocate(10)
    y = a.allocate(10)
    assert not a.can_grow_in_place(x, 11)
    assert a.grow_in_place(x, 11) is None
    a.free(y)
    z = a.allocate(15)  # best fit puts it at... the only hole, 10..100 -> (10, 15)
    assert z == Extent(10, 15)
    assert a.grow_in_place(x, 11) is None
    # y's old slot is used by z, which can grow into the tail
    assert a.grow_in_place(z, 90) == Extent(10, 90)
    assert a.grow_in_place(Extent(10, 90), 91) is None
    # growing to the same or a smaller size is a no-op
    assert a.grow_in_place(x, 10) == x and a.grow_in_place(x, 5) == x
    assert a.used_tokens == 100
    a.check_integrity()


def test_shrink_gives_back_the_tail_and_coalesces() -> None:
    a = ExtentAllocator(100)
    x = a.allocate(40)
    y = a.allocate(20)
    s = a.shrink(x, 25)
    assert s == Extent(0, 25)
    assert _free_map(a) == [(25, 15), (60, 40)]
    a.free(y)
    assert _free_map(a) == [(25, 75)]
    s2 = a.shrink(s, 10)  # coalesces with the free run on the right
    assert s2 == Extent(0, 10) and _free_map(a) == [(10, 90)]
    assert a.shrink(s2, 10) == s2
    assert a.used_tokens == 10
    a.check_integrity()


def test_fragmentation_figures() -> None:
    a = ExtentAllocator(100)
    f = a.fragmentation()
    assert (f.free_tokens, f.largest_free_tokens, f.num_free_extents, f.num_used_extents) == (100, 100, 1, 0)
    assert f.external_fragmentation == 0.0
    xs = [a.allocate(10) for _ in range(10)]
    f = a.fragmentation()
    assert (f.free_tokens, f.largest_free_tokens, f.num_free_extents, f.num_used_extents) == (0, 0, 0, 10)
    assert f.external_fragmentation == 0.0
    a.free(xs[1])
    a.free(xs[4])
    a.free(xs[5])
    f = a.fragmentation()
    assert (f.free_tokens, f.largest_free_tokens, f.num_free_extents, f.num_used_extents) == (30, 20, 2, 7)
    assert f.external_fragmentation == pytest.approx(1 - 20 / 30)
    assert a.largest_free() == 20 and a.can_allocate(20) and not a.can_allocate(21) and not a.can_allocate(0)


def test_base_offset_and_zero_capacity() -> None:
    a = ExtentAllocator(10, base=1000)
    assert a.allocate(4) == Extent(1000, 4)
    assert a.allocate(7) is None
    a.check_integrity()
    z = ExtentAllocator(0)
    assert z.allocate(1) is None and z.largest_free() == 0
    z.check_integrity()


def test_invalid_free_is_an_assertion() -> None:
    a = ExtentAllocator(10)
    x = a.allocate(5)
    with pytest.raises(AssertionError):
        a.free(Extent(x.start + 1, 4))
    a.free(x)
    with pytest.raises(AssertionError):
        a.free(x)
    with pytest.raises(AssertionError):
        a.allocate(0)


CAP = 64


class ExtentMachine(RuleBasedStateMachine):
    """Random allocate / free / grow_in_place / shrink, checked against an owner-per-slot model."""

    def __init__(self) -> None:
        super().__init__()
        self.base = 7
        self.a = ExtentAllocator(CAP, base=self.base)
        self.owner = bytearray(CAP)  # 0 = free, else an id in 1..255
        self.live: dict[int, Extent] = {}
        self.next_id = 1

    def _holes(self) -> list[tuple[int, int]]:
        holes, i = [], 0
        while i < CAP:
            if self.owner[i] == 0:
                j = i
                while j < CAP and self.owner[j] == 0:
                    j += 1
                holes.append((i + self.base, j - i))
                i = j
            else:
                i += 1
        return holes

    def _paint(self, e: Extent, oid: int) -> None:
        for s in e.slots():
            assert self.owner[s - self.base] in (0, oid), f"overlap at slot {s}"
            self.owner[s - self.base] = oid

    @rule(n=st.integers(1, 40))
    def allocate(self, n: int) -> None:
        holes = self._holes()
        fits = [h for h in holes if h[1] >= n]
        e = self.a.allocate(n)
        if not fits:
            assert e is None
            return
        best = min(fits, key=lambda h: (h[1], h[0]))
        assert e == Extent(best[0], n), f"best fit of {n} in {holes} should be {best}, got {e}"
        oid = self._new_id()
        self._paint(e, oid)
        self.live[oid] = e

    def _new_id(self) -> int:
        oid = (self.next_id - 1) % 255 + 1
        while oid in self.live:
            oid = oid % 255 + 1
        self.next_id += 1
        return oid

    @rule(data=st.data())
    def allocate_at(self, data: st.DataObject) -> None:
        """A run inside a hole, its hole named (as ODMA places): the pieces left on either side stay free."""
        holes = self._holes()
        if not holes:
            return
        hole_start, hole_len = data.draw(st.sampled_from(holes))
        offset = data.draw(st.integers(0, hole_len - 1))
        n = data.draw(st.integers(1, hole_len - offset))
        e = self.a.allocate_at(hole_start + offset, n, hole_start)
        assert e == Extent(hole_start + offset, n)
        oid = self._new_id()
        self._paint(e, oid)
        self.live[oid] = e

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        oid = data.draw(st.sampled_from(sorted(self.live)))
        e = self.live.pop(oid)
        self.a.free(e)
        for s in e.slots():
            self.owner[s - self.base] = 0

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), extra=st.integers(0, 30))
    def grow(self, data: st.DataObject, extra: int) -> None:
        oid = data.draw(st.sampled_from(sorted(self.live)))
        e = self.live[oid]
        end = e.end - self.base
        room = 0
        while end + room < CAP and self.owner[end + room] == 0:
            room += 1
        assert self.a.can_grow_in_place(e, e.length + extra) == (extra <= room)
        g = self.a.grow_in_place(e, e.length + extra)
        if extra > room:
            assert g is None
            return
        assert g == Extent(e.start, e.length + extra)
        self._paint(g, oid)
        self.live[oid] = g

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def shrink(self, data: st.DataObject) -> None:
        oid = data.draw(st.sampled_from(sorted(self.live)))
        e = self.live[oid]
        n = data.draw(st.integers(1, e.length))
        s = self.a.shrink(e, n)
        assert s == Extent(e.start, n)
        for slot in range(s.end, e.end):
            self.owner[slot - self.base] = 0
        self.live[oid] = s

    @invariant()
    def consistent(self) -> None:
        self.a.check_integrity()
        assert self.a.free_tokens == self.owner.count(0)
        assert self.a.used_tokens == CAP - self.owner.count(0)
        assert self.a.used_extents() == sorted(self.live.values(), key=lambda e: e.start)
        holes = self._holes()
        f = self.a.fragmentation()
        assert f.num_free_extents == len(holes)
        assert f.largest_free_tokens == max((h[1] for h in holes), default=0)
        assert f.num_used_extents == len(self.live)
        by_size = sorted((n, s) for s, n in holes)  # the order placement reads holes in
        for min_length in (1, 5, 20):
            assert self.a.holes_at_least(min_length, 3) == [h for h in by_size if h[0] >= min_length][:3]
        assert self.a.largest_holes(3) == by_size[::-1][:3]
        assert self.a.largest_holes(len(holes)) == by_size[::-1]


ExtentMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestExtentMachine = ExtentMachine.TestCase
