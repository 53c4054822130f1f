"""The sliding-window KV group: one contiguous ring of ``window_tokens`` slots per request.

A sliding-window layer attends to the last ``window_tokens`` positions only (transformers:
key ``k`` is visible to query ``q`` when ``q - window < k <= q``), so a request never needs
more than ``window_tokens`` K/V entries per sliding layer. Each admitted request gets one
ring slot; token ``p`` lives at ring index ``p % window``::

    ring slot r, one sliding layer, window 8:   [ 8  9 10 11  4  5  6  7 ]   (p = 11 just written)
                                                  ^ tokens 0..3 were overwritten in place:
                                                    they left the window and are never read

No page table, no eviction copy: writing token ``p`` overwrites token ``p - window``, which
has just left the window. Reads take the whole ring (one contiguous run of ``window``
tokens per layer); entries past a short request's length are masked, and attention does
not care about the order of its keys (rotary is applied before the write).

Memory accounting: a request holds ``window_tokens`` ring slots per sliding layer for its
whole life (``held_bytes``), however long it grows; the tokens that slid out of the window
(``evicted_tokens``) are counted as freed, next to the full-attention group's growth.

The full-attention layers keep the arena and its KV policy. ``WindowedPolicy`` ties the
two groups together for the scheduler: admission takes a ring slot as well as the policy's
reservation (no free ring = ``None`` = wait), and every release (finish, preemption, abort)
returns the ring. ``split_kv_budget`` divides one device memory budget between the groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from odma_mlu.errors import ConfigError


@dataclass(frozen=True)
class WindowStats:
    """Accounting of the ring group at one moment."""

    window_tokens: int
    num_slots: int
    used_slots: int
    bytes_per_slot: int
    held_bytes: int
    """Ring memory of the admitted requests: used_slots x bytes_per_slot."""
    live_tokens: int
    """K/V entries that attention can still read: sum of min(tokens, window) per request."""
    evicted_tokens: int
    """Tokens that left their request's window: overwritten in place, never read again."""


class RingPool:
    """Ring slots of ``window_tokens`` tokens for ``num_layers`` sliding layers.

    ``k[layer]`` / ``v[layer]`` are flat ``[num_slots * window_tokens, kv_heads, head_dim]``
    tensors (ring ``r`` is rows ``[r * window, (r + 1) * window)``), or absent when
    ``shape_only`` (accounting for the emulator).
    """

    def __init__(self, num_layers: int, window_tokens: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 shape_only: bool = False) -> None:
        if window_tokens <= 0:
            raise ConfigError(f"sliding window of {window_tokens} tokens: it must be >= 1 (config.json sliding_window)")
        if num_slots <= 0:
            raise ConfigError(f"{num_slots} ring slots: the window group needs at least one (raise the KV budget "
                              "or window_slots)")
        assert num_layers > 0, "a ring pool without sliding layers"
        self.num_layers = num_layers
        self.window_tokens = int(window_tokens)
        self.num_slots = int(num_slots)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device, self.shape_only = dtype, torch.device(device), shape_only
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        if not shape_only:
            shape = (self.num_slots * self.window_tokens, num_kv_heads, head_dim)
            for _ in range(num_layers):
                self.k.append(torch.zeros(shape, dtype=dtype, device=self.device))
                self.v.append(torch.zeros(shape, dtype=dtype, device=self.device))
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))  # LIFO, lowest slot out first
        self._owner: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    # -- allocation ---------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def holds(self, request_id: str) -> bool:
        return request_id in self._owner

    def allocate(self, request_id: str) -> int | None:
        """A ring slot for ``request_id``; None when every slot is taken (the caller waits)."""
        assert request_id not in self._owner, f"request {request_id} already holds ring slot {self._owner[request_id]}"
        if not self._free:
            return None
        slot = self._free.pop()
        self._owner[request_id] = slot
        self._tokens[request_id] = 0
        return slot

    def free(self, request_id: str) -> None:
        slot = self._owner.pop(request_id)
        self._tokens.pop(request_id)
        self._free.append(slot)

    def slot_of(self, request_id: str) -> int:
        return self._owner[request_id]

    def plan(self, seqs: Any, request_ids: list[str], device: torch.device | str = "cpu") -> Any:
        """The ``RingBatch`` of one forward step (``seqs``: its SequenceInputs, in order)."""
        from odma_mlu.models.window_attention import RingBatch  # models import kvcache, not the reverse

        for seq, rid in zip(seqs, request_ids):
            self.note_tokens(rid, seq.num_total_tokens)
        return RingBatch.build(self, seqs, [self._owner[rid] for rid in request_ids], device)

    def note_tokens(self, request_id: str, total_tokens: int) -> None:
        """Record that ``request_id`` has written K/V up to ``total_tokens`` (accounting only)."""
        self._tokens[request_id] = max(self._tokens[request_id], total_tokens)

    # -- accounting ---------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over the sliding layers."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_slot(self) -> int:
        return self.window_tokens * self.bytes_per_token

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.bytes_per_slot

    def stats(self) -> WindowStats:
        w = self.window_tokens
        tokens = self._tokens.values()
        return WindowStats(w, self.num_slots, len(self._owner), self.bytes_per_slot,
                           len(self._owner) * self.bytes_per_slot, sum(min(t, w) for t in tokens),
                           sum(max(0, t - w) for t in tokens))

    def check_integrity(self) -> None:
        used = list(self._owner.values())
        assert len(used) == len(set(used)), "a ring slot has two owners"
        assert len(set(self._free)) == len(self._free), "a ring slot is free twice"
        assert not set(used) & set(self._free), "a ring slot is both free and owned"
        assert len(used) + len(self._free) == self.num_slots, "ring slots leaked"
        assert all(0 <= s < self.num_slots for s in used + self._free), "a ring slot outside the pool"
        assert set(self._tokens) == set(self._owner), "token accounting out of step with the owners"


class WindowedPolicy:
    """A full-attention KV policy plus the ring group, as one policy for the scheduler.

    Everything is delegated to ``inner`` except admission (a request also needs a free
    ring slot, else ``reserve`` returns None and the scheduler waits) and release (the ring
    is returned on finish, preemption and abort alike).
    """

    def __init__(self, inner: Any, rings: RingPool) -> None:
        self.inner = inner
        self.rings = rings

    def __getattr__(self, name: str) -> Any:  # name, layout, capacity_tokens, location, ...
        return getattr(self.inner, name)

    def can_reserve(self, req: Any) -> bool:
        return self.rings.num_free_slots > 0 and self.inner.can_reserve(req)

    def reserve(self, req: Any) -> Any:
        if self.rings.num_free_slots == 0:
            return None
        loc = self.inner.reserve(req)
        if loc is not None:
            self.rings.allocate(req.request_id)
            self.rings.note_tokens(req.request_id, req.num_tokens)
        return loc

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> Any:
        res = self.inner.ensure_capacity(request_id, needed_tokens)
        self.rings.note_tokens(request_id, needed_tokens)
        return res

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.inner.release(request_id, generated_tokens)
        if self.rings.holds(request_id):
            self.rings.free(request_id)

    def check_integrity(self) -> None:
        self.inner.check_integrity()
        self.rings.check_integrity()
        assert self.rings.stats().used_slots == self.inner.num_live(), (
            f"{self.rings.stats().used_slots} ring slots held by {self.inner.num_live()} live requests")


@dataclass(frozen=True)
class KVGroupSplit:
    """How one KV memory budget is divided between the two groups."""

    budget_bytes: int
    arena_tokens: int
    """Token capacity of the full-attention arena (full layers only)."""
    ring_slots: int
    ring_bytes: int


def plan_window_group(model: Any, kv_capacity_tokens: int, max_num_seqs: int,
                      ring_slots: int | None = None) -> KVGroupSplit | None:
    """The engine's split for a model with sliding layers (None without): the budget is
    ``kv_capacity_tokens`` tokens of K/V over *all* layers, as for a full-attention model."""
    if getattr(model, "window_tokens", None) is None:
        return None
    spec = model.spec
    elem = torch.tensor([], dtype=model.dtype).element_size()
    per_layer_token_bytes = 2 * spec.num_kv_heads * spec.head_dim * elem
    return split_kv_budget(kv_capacity_tokens * spec.num_layers * per_layer_token_bytes,
                           model.num_full_layers * per_layer_token_bytes,
                           model.window_tokens * model.num_sliding_layers * per_layer_token_bytes,
                           max_num_seqs, ring_slots)


def split_kv_budget(budget_bytes: int, full_bytes_per_token: int, ring_bytes_per_slot: int, max_num_seqs: int,
                    ring_slots: int | None = None, max_ring_fraction: float = 0.5) -> KVGroupSplit:
    """Divide ``budget_bytes`` between ring slots and full-attention arena tokens.

    ``ring_slots`` None: as many rings as ``max_num_seqs`` allows, within
    ``max_ring_fraction`` of the budget (at least one). A model without full layers
    (``full_bytes_per_token`` 0) gives the arena one token (policies need a positive
    capacity) and every byte to rings.
    """
    if budget_bytes <= 0:
        raise ConfigError(f"KV budget of {budget_bytes} bytes: it must be positive (raise kv_capacity_tokens)")
    if ring_slots is None:
        fraction = 1.0 if full_bytes_per_token == 0 else max_ring_fraction
        ring_slots = max(1, min(max_num_seqs, int(budget_bytes * fraction) // ring_bytes_per_slot))
    ring_bytes = ring_slots * ring_bytes_per_slot
    left = budget_bytes - ring_bytes
    arena_tokens = 1 if full_bytes_per_token == 0 else left // full_bytes_per_token
    if ring_slots <= 0 or left < 0 or arena_tokens <= 0:
        raise ConfigError(f"a KV budget of {budget_bytes} bytes cannot hold {ring_slots} ring slots of "
                          f"{ring_bytes_per_slot} bytes plus a full-attention arena; raise kv_capacity_tokens "
                          "or lower window_slots")
    return KVGroupSplit(budget_bytes, int(arena_tokens), int(ring_slots), ring_bytes)
