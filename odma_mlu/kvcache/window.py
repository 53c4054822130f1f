"""The sliding-window KV group: per request, a ring that starts at the prompt, grows in
place to the window, then wraps.

A sliding-window layer attends to the last ``window_tokens`` positions only (transformers:
key ``k`` is visible to query ``q`` when ``q - window < k <= q``), so a request never needs
more than ``window_tokens`` K/V entries per sliding layer. Token ``p`` lives at ring index
``p % window``; the ring's capacity is always at least ``min(tokens, window)`` and exactly
``window`` once the request is longer, so that index never moves while the ring grows::

    ring slots of one request, window 8, granule 4:
      prompt of 3        [0 1 2 .]                          4 slots held
      grows in place     [0 1 2 3 4 5 . .]                  8 slots (= window)
      wraps (p = 11)     [8 9 10 11 4 5 6 7]                tokens 0..3 overwritten in place
    blocked growth: a second run   [0 1 2 3] ... [4 5 . .]  wrap continues over every run

The pool (``RingPool``) is an ``ExtentAllocator`` over ``capacity_slots`` token slots
(rows of ``k[layer]`` / ``v[layer]``). A new ring takes ``min(prompt, window)`` rounded up
to ``granule_tokens`` slots, placed where it can grow: in a hole with ``room`` slots free
after it (``min(prompt + predicted output, window)``), past the unclaimed room of a growing
ring on the hole's left. Growth extends the last run in place; when the right neighbour is
taken it adds a run (placed with room up to the window), else it fails and the policy
reports NO_ROOM (the scheduler preempts). Where no single hole fits a new ring or its
growth, it takes pieces of the largest holes; a ring has at most ``max_runs`` runs (64).
No copies, ever.

Memory accounting counts held slots (``held_bytes``); tokens that slid out of the window
(``evicted_tokens``) are overwritten in place and counted as freed.

``WindowedPolicy`` ties the ring group to the full-attention layers' policy (the arena's):
admission also places a ring (none fits = wait), ``ensure_capacity`` also grows it, every
release (finish, preemption, abort) frees it. ``split_kv_budget`` divides one device memory
budget between the groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.arena import covering_runs
from odma_mlu.kvcache.extent import Extent, ExtentAllocator
from odma_mlu.kvcache.policy import GrowResult, GrowStatus

RING_GRANULE_TOKENS = 16
RING_MAX_RUNS = 64
Run = tuple[int, int]  # (first slot, length in slots)


@dataclass(frozen=True)
class WindowStats:
    """Accounting of the ring group at one moment."""

    window_tokens: int
    capacity_slots: int
    num_rings: int
    held_slots: int
    bytes_per_slot: int
    """K and V of one token over every sliding layer."""
    held_bytes: int
    """Ring memory of the admitted requests: held_slots x bytes_per_slot."""
    live_tokens: int
    """K/V entries that attention can still read: sum of min(tokens, window) per request."""
    evicted_tokens: int
    """Tokens that left their request's window: overwritten in place, never read again."""


@dataclass
class _Ring:
    runs: list[Extent]
    room_slots: int
    """The size this ring is expected to reach (placement keeps it free after the last run)."""
    tokens: int = 0
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        self.slots = sum(e.length for e in self.runs)


class RingPool:
    """Growing rings of at most ``window_tokens`` slots for ``num_layers`` sliding layers.

    ``k[layer]`` / ``v[layer]`` are flat ``[capacity_slots, kv_heads, head_dim]`` tensors, or
    absent when ``shape_only`` (accounting for the emulator). ``capacity_slots`` defaults to
    ``num_windows`` whole windows.
    """

    def __init__(self, num_layers: int, window_tokens: int, num_windows: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 shape_only: bool = False, *, capacity_slots: int | None = None,
                 granule_tokens: int | None = None, max_runs: int = RING_MAX_RUNS) -> None:
        if window_tokens <= 0:
            raise ConfigError(f"sliding window of {window_tokens} tokens: it must be >= 1 (config.json sliding_window)")
        capacity = num_windows * window_tokens if capacity_slots is None else capacity_slots
        if capacity < window_tokens:
            raise ConfigError(f"a ring pool of {capacity} slots cannot hold one window of {window_tokens} tokens "
                              "(raise the KV budget or window_slots)")
        assert num_layers > 0 and max_runs >= 1, "a ring pool without sliding layers or runs"
        self.num_layers = num_layers
        self.window_tokens = int(window_tokens)
        self.capacity_slots = int(capacity)
        self.max_runs = max_runs
        self._granule = min(granule_tokens or RING_GRANULE_TOKENS, self.window_tokens)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device, self.shape_only = dtype, torch.device(device), shape_only
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        if not shape_only:
            shape = (self.capacity_slots, num_kv_heads, head_dim)
            for _ in range(num_layers):
                self.k.append(torch.zeros(shape, dtype=dtype, device=self.device))
                self.v.append(torch.zeros(shape, dtype=dtype, device=self.device))
        self.allocator = ExtentAllocator(self.capacity_slots)
        self._rings: dict[str, _Ring] = {}
        self._growing_at: dict[int, str] = {}  # first slot of a ring's last run -> its request
        self.in_place_grows = 0
        self.second_runs = 0
        self.blocked_grows = 0

    # -- sizes ----------------------------------------------------------------------------
    @property
    def granule_tokens(self) -> int:
        return self._granule

    @granule_tokens.setter
    def granule_tokens(self, tokens: int) -> None:
        assert not self._rings, "change the ring granule only while the pool is empty"
        self._granule = max(1, min(tokens, self.window_tokens))

    def ring_slots_for(self, tokens: int) -> int:
        """Slots a ring needs to hold ``tokens``: min(tokens rounded up to the granule, window)."""
        g = self._granule
        return min(-(-max(1, tokens) // g) * g, self.window_tokens)

    # -- allocation -----------------------------------------------------------------------
    def holds(self, request_id: str) -> bool:
        return request_id in self._rings

    @property
    def free_slots(self) -> int:
        return self.allocator.free_tokens

    def _claim_left_of(self, hole_start: int) -> int:
        """Unclaimed growth of the ring whose last run ends where this hole starts."""
        left = self.allocator.start_of_used_ending_at(hole_start)
        rid = None if left is None else self._growing_at.get(left)
        if rid is None:
            return 0
        ring = self._rings[rid]
        return max(0, ring.room_slots - ring.slots)

    def _place(self, slots: int, room_slots: int) -> int | None:
        """Where a run of ``slots`` should start (None: no hole fits). Preference: a hole
        with ``room_slots`` free past any neighbour's claim; then one that at least keeps the
        claim; then any hole, at its end (as far as possible from the grower on its left)."""
        fallback: int | None = None
        candidates = self.allocator.holes_at_least(room_slots, 16) + self.allocator.largest_holes(4)
        for length, start in candidates:
            claim = self._claim_left_of(start)
            if length - claim >= room_slots:
                return start + claim
        for length, start in self.allocator.holes_at_least(slots, 32):
            claim = self._claim_left_of(start)
            if length - claim >= slots:
                return start + claim
            if fallback is None:
                fallback = start + length - slots
        return fallback

    def _take(self, slots: int, room_slots: int, max_pieces: int) -> list[Extent] | None:
        """One run placed by ``_place``; when no hole fits, up to ``max_pieces`` runs from the
        largest holes (a fragmented pool still admits and grows); None if neither fits."""
        start = self._place(slots, room_slots)
        if start is not None:
            got = self.allocator.allocate_at(start, slots)
            assert got is not None
            return [got]
        if not self._fits_in_pieces(slots, max_pieces):
            return None
        runs: list[Extent] = []
        for length, hole in self.allocator.largest_holes(max_pieces):
            take = min(length, slots - sum(e.length for e in runs))
            got = self.allocator.allocate_at(hole, take, hole_start=hole)
            assert got is not None
            runs.append(got)
            if sum(e.length for e in runs) == slots:
                return runs
        raise AssertionError("the largest holes were counted to fit")

    def _fits_in_pieces(self, slots: int, max_pieces: int) -> bool:
        return max_pieces > 0 and sum(n for n, _ in self.allocator.largest_holes(max_pieces)) >= slots

    def can_allocate(self, tokens: int) -> bool:
        return self._fits_in_pieces(self.ring_slots_for(tokens), self.max_runs)

    def allocate(self, request_id: str, tokens: int, room_tokens: int | None = None) -> bool:
        """A ring holding ``tokens`` for ``request_id``, placed to grow to ``room_tokens``;
        False when no hole fits (the caller waits)."""
        assert request_id not in self._rings, f"request {request_id} already holds a ring"
        slots = self.ring_slots_for(tokens)
        room = max(slots, self.ring_slots_for(room_tokens if room_tokens is not None else self.window_tokens))
        runs = self._take(slots, room, self.max_runs)
        if runs is None:
            return False
        self._rings[request_id] = _Ring(runs, room, tokens)
        self._growing_at[runs[-1].start] = request_id
        return True

    def ensure(self, request_id: str, tokens: int) -> bool:
        """Room for ``tokens``: grow the last run in place, else add a run; False if neither."""
        ring = self._rings[request_id]
        need = self.ring_slots_for(tokens)
        if need > ring.slots:
            extra = need - ring.slots
            ring.room_slots = max(ring.room_slots, need)
            last = ring.runs[-1]
            grown = self.allocator.grow_in_place(last, last.length + extra)
            if grown is not None:
                ring.runs[-1] = grown
                self.in_place_grows += 1
            elif len(ring.runs) < self.max_runs and \
                    (runs := self._take(extra, self.window_tokens - ring.slots, self.max_runs - len(ring.runs))):
                ring.room_slots = self.window_tokens  # it outgrew its room: the new run keeps room to the window
                del self._growing_at[last.start]
                ring.runs.extend(runs)
                self._growing_at[runs[-1].start] = request_id
                self.second_runs += len(runs)
            else:
                self.blocked_grows += 1
                return False
            ring.slots = need
        ring.tokens = max(ring.tokens, tokens)
        return True

    def free(self, request_id: str) -> None:
        ring = self._rings.pop(request_id)
        del self._growing_at[ring.runs[-1].start]
        for run in ring.runs:
            self.allocator.free(run)

    def runs_of(self, request_id: str) -> tuple[Run, ...]:
        """The ring's runs in ring order: ring index i is the i-th slot read one run after another."""
        return tuple((e.start, e.length) for e in self._rings[request_id].runs)

    def read_runs(self, request_id: str, tokens: int) -> tuple[int, ...]:
        """Lengths of the runs a decode over ``tokens`` reads: ring indices [0, min(tokens, window))."""
        return covering_runs((e.length for e in self._rings[request_id].runs), min(tokens, self.window_tokens))

    def plan(self, seqs: Any, request_ids: list[str], device: torch.device | str = "cpu") -> Any:
        """The ``RingBatch`` of one forward step (``seqs``: its SequenceInputs, in order)."""
        from odma_mlu.models.window_attention import RingBatch  # models import kvcache, not the reverse

        for seq, rid in zip(seqs, request_ids):
            self.note_tokens(rid, seq.num_total_tokens)
        return RingBatch.build(self, seqs, [self.runs_of(rid) for rid in request_ids], device)

    def note_tokens(self, request_id: str, total_tokens: int) -> None:
        """Record that ``request_id`` has written K/V up to ``total_tokens``."""
        ring = self._rings[request_id]
        assert ring.slots >= self.ring_slots_for(total_tokens) or ring.slots == self.window_tokens, (
            f"{request_id}: a ring of {ring.slots} slots cannot hold {total_tokens} tokens")
        ring.tokens = max(ring.tokens, total_tokens)

    # -- accounting -----------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over the sliding layers."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.capacity_slots * self.bytes_per_token

    def stats(self) -> WindowStats:
        w = self.window_tokens
        tokens = [r.tokens for r in self._rings.values()]
        held = self.allocator.used_tokens
        return WindowStats(w, self.capacity_slots, len(self._rings), held, self.bytes_per_token,
                           held * self.bytes_per_token, sum(min(t, w) for t in tokens),
                           sum(max(0, t - w) for t in tokens))

    def check_integrity(self) -> None:
        self.allocator.check_integrity()
        used = set(self.allocator.used_extents())
        runs = [e for r in self._rings.values() for e in r.runs]
        assert len(runs) == len(used) and set(runs) == used, "ring runs and the allocator's extents differ"
        assert self._growing_at == {r.runs[-1].start: rid for rid, r in self._rings.items()}, "last-run index drifted"
        w = self.window_tokens
        for rid, r in self._rings.items():
            assert 1 <= len(r.runs) <= self.max_runs, f"{rid}: {len(r.runs)} runs"
            assert r.slots == sum(e.length for e in r.runs) <= w, f"{rid}: {r.slots} slots for a window of {w}"
            assert r.slots >= min(r.tokens, w), f"{rid}: {r.slots} slots hold fewer than its {r.tokens} tokens"


class WindowedPolicy:
    """A full-attention KV policy plus the ring group, as one policy for the scheduler.

    Everything is delegated to ``inner`` except admission (a request also needs a ring:
    none fits = ``reserve`` returns None and the scheduler waits), growth (the ring grows
    with the request; blocked = NO_ROOM, the scheduler preempts) and release (the ring is
    freed on finish, preemption and abort alike). A policy that sizes a request's one run
    at admission (static, exact, S3) sizes its ring alike, min(that run, window), so the
    ring never needs more than the policy reserved; the others start it at the prompt.
    The ring group keeps the inner policy's admission watermark, as a share of its slots.
    """

    def __init__(self, inner: Any, rings: RingPool) -> None:
        self.inner = inner
        self.rings = rings
        fraction = inner.watermark_tokens / inner.capacity_tokens if getattr(inner, "capacity_tokens", 0) else 0.0
        self.ring_watermark_slots = int(fraction * rings.capacity_slots)

    def __getattr__(self, name: str) -> Any:  # name, layout, capacity_tokens, location, ...
        return getattr(self.inner, name)

    def _ring_tokens(self, req: Any) -> tuple[int, int]:
        """(tokens the ring holds at admission, tokens it is placed to grow to)."""
        sized = getattr(self.inner, "initial_tokens", None)
        if sized is not None:  # ContiguousPolicy: the run it reserves now is all it gets
            n = max(req.num_tokens, sized(req))
            return n, n
        grow_to = req.max_total_tokens
        if req.prediction is not None:
            grow_to = min(grow_to, req.prompt_tokens + int(req.prediction.at(0.9)))
        return req.num_tokens, max(req.num_tokens, grow_to)

    def _ring_fits(self, tokens: int) -> bool:
        slots = self.rings.ring_slots_for(tokens)
        return self.rings.can_allocate(tokens) and self.rings.free_slots - slots >= self.ring_watermark_slots

    def can_reserve(self, req: Any) -> bool:
        return self._ring_fits(self._ring_tokens(req)[0]) and self.inner.can_reserve(req)

    def reserve(self, req: Any) -> Any:
        now, room = self._ring_tokens(req)
        if not self._ring_fits(now):
            return None
        loc = self.inner.reserve(req)
        if loc is not None and not self.rings.allocate(req.request_id, now, room):
            self.inner.release(req.request_id, None)
            return None
        return loc

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        res = self.inner.ensure_capacity(request_id, needed_tokens)
        if res.status != GrowStatus.OK:
            return res
        if not self.rings.ensure(request_id, needed_tokens):
            return GrowResult(GrowStatus.NO_ROOM)
        return res

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.inner.release(request_id, generated_tokens)
        if self.rings.holds(request_id):
            self.rings.free(request_id)

    def check_integrity(self) -> None:
        self.inner.check_integrity()
        self.rings.check_integrity()
        assert self.rings.stats().num_rings == self.inner.num_live(), (
            f"{self.rings.stats().num_rings} rings held by {self.inner.num_live()} live requests")


@dataclass(frozen=True)
class KVGroupSplit:
    """How one KV memory budget is divided between the two groups."""

    budget_bytes: int
    arena_tokens: int
    """Token capacity of the full-attention arena (full layers only)."""
    ring_slots: int
    """Token slots of the ring pool (sliding layers only)."""
    ring_bytes: int


def plan_window_group(model: Any, kv_capacity_tokens: int, max_num_seqs: int,
                      ring_windows: int | None = None) -> KVGroupSplit | None:
    """The engine's split for a model with sliding layers (None without): the budget is
    ``kv_capacity_tokens`` tokens of K/V over *all* layers, as for a full-attention model."""
    if getattr(model, "window_tokens", None) is None:
        return None
    spec = model.spec
    elem = torch.tensor([], dtype=model.dtype).element_size()
    per_layer_token_bytes = 2 * spec.num_kv_heads * spec.head_dim * elem
    return split_kv_budget(kv_capacity_tokens * spec.num_layers * per_layer_token_bytes,
                           model.num_full_layers * per_layer_token_bytes,
                           model.num_sliding_layers * per_layer_token_bytes, model.window_tokens,
                           max_num_seqs, ring_windows)


def split_kv_budget(budget_bytes: int, full_bytes_per_token: int, ring_bytes_per_slot: int, window_tokens: int,
                    max_num_seqs: int, ring_windows: int | None = None,
                    ring_slots_per_arena_token: float = 1.0) -> KVGroupSplit:
    """Divide ``budget_bytes`` between ring slots and full-attention arena tokens.

    ``ring_windows``: that many whole windows of ring slots, the rest to the arena. None:
    ``ring_slots_per_arena_token`` ring slots per arena token (1.0: each group holds as many
    tokens, which a request shorter than the window needs), at most ``max_num_seqs``
    windows, at least one. A model without full layers (``full_bytes_per_token`` 0) gives
    the arena one token (policies need a positive capacity) and every byte to rings.
    """
    if budget_bytes <= 0:
        raise ConfigError(f"KV budget of {budget_bytes} bytes: it must be positive (raise kv_capacity_tokens)")
    if ring_windows is not None:
        ring_slots = ring_windows * window_tokens
    elif full_bytes_per_token == 0:
        ring_slots = budget_bytes // ring_bytes_per_slot
    else:
        r = ring_slots_per_arena_token
        ring_slots = int(budget_bytes * r / (r * ring_bytes_per_slot + full_bytes_per_token))
    if ring_windows is None:
        ring_slots = max(window_tokens, min(ring_slots, max_num_seqs * window_tokens))
    ring_bytes = ring_slots * ring_bytes_per_slot
    left = budget_bytes - ring_bytes
    arena_tokens = 1 if full_bytes_per_token == 0 else left // full_bytes_per_token
    if ring_slots < window_tokens or left < 0 or arena_tokens <= 0:
        raise ConfigError(f"a KV budget of {budget_bytes} bytes cannot hold {ring_slots} ring slots of "
                          f"{ring_bytes_per_slot} bytes plus a full-attention arena; raise kv_capacity_tokens "
                          "or lower window_slots")
    return KVGroupSplit(budget_bytes, int(arena_tokens), int(ring_slots), ring_bytes)
