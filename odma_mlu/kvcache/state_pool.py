"""Fixed-size state slots for the SSM layers of hybrid models, next to the attention KV.

One slot holds one request's state for every SSM layer, contiguously::

    buffer (uint8) [num_slots, slot_bytes]
    slot s:  | layer 0: conv [conv_dim, d_conv] | ssm [heads, head_dim, d_state] f32 | layer 1: ... |
             '---------------------------- slot_bytes (64-byte aligned parts) ------------------'

``conv[i]`` / ``ssm[i]`` are strided views of SSM layer ``i``'s part of every slot
([num_slots, ...]), so a forward step indexes them by slot like the arena's K/V by token
slot, and moving or dropping a request's state is one contiguous copy of ``slot_bytes``.

Slots are handed out lowest-free-first (deterministic). The pool can be resized (AVMP
capacity migration, odma_mlu/kvcache/avmp.py): growing appends slots; shrinking first moves
the live states above the new size into free slots below it (compaction), and the bytes
copied are counted in ``moved_bytes``. ``shape_only=True`` keeps the accounting without
tensors (emulator replay).
"""

from __future__ import annotations

import heapq

import torch

from odma_mlu.errors import ConfigError
from odma_mlu.models.hybrid_spec import STATE_ALIGN_BYTES, HybridSpec, _align


class StatePool:
    """Per-request SSM state slots of one hybrid model, with a resizable slot count."""

    def __init__(self, hybrid: HybridSpec, num_slots: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float16, shape_only: bool = False) -> None:
        if num_slots < 0:
            raise ConfigError(f"state pool num_slots must be >= 0, got {num_slots}")
        self.hybrid = hybrid
        self.device = torch.device(device)
        self.dtype = dtype
        self.shape_only = shape_only
        elem = torch.tensor([], dtype=dtype).element_size()
        if elem != hybrid.base.dtype_bytes:
            raise ConfigError(f"state pool dtype {dtype} ({elem} B) differs from the model spec's "
                              f"{hybrid.base.dtype} ({hybrid.base.dtype_bytes} B); build both with one dtype")
        self.conv_bytes = _align(hybrid.conv_state_bytes_per_layer)
        self.slot_bytes = hybrid.state_bytes_per_request
        self.num_slots = 0
        self.buffer = torch.empty(0, self.slot_bytes, dtype=torch.uint8, device=self.device)
        self.conv: list[torch.Tensor] = []
        self.ssm: list[torch.Tensor] = []
        self._owner: dict[str, int] = {}
        self._slot_owner: dict[int, str] = {}
        self._free: list[int] = []  # min-heap of free slot indices
        self.moved_bytes = 0
        self.resize(num_slots)

    # -- views ---------------------------------------------------------------------------
    def _make_views(self) -> None:
        hs = self.hybrid
        self.conv, self.ssm = [], []
        if self.shape_only:
            return
        per_layer = hs.state_bytes_per_layer
        for i in range(hs.num_ssm_layers):
            base = i * per_layer
            conv = self.buffer[:, base:base + hs.conv_state_bytes_per_layer].view(self.dtype)
            self.conv.append(conv.view(self.num_slots, hs.conv_dim, hs.d_conv))
            off = base + self.conv_bytes
            ssm = self.buffer[:, off:off + hs.ssm_state_bytes_per_layer].view(torch.float32)
            self.ssm.append(ssm.view(self.num_slots, hs.num_ssm_heads, hs.ssm_head_dim, hs.d_state))

    # -- slots ---------------------------------------------------------------------------
    @property
    def num_live(self) -> int:
        return len(self._owner)

    @property
    def num_free(self) -> int:
        return self.num_slots - len(self._owner)

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def slot_of(self, request_id: str) -> int:
        return self._owner[request_id]

    def holds(self, request_id: str) -> bool:
        return request_id in self._owner

    def allocate(self, request_id: str) -> int | None:
        """The lowest free slot for ``request_id``, or None when every slot is taken."""
        assert request_id not in self._owner, f"request {request_id} already holds state slot {self._owner[request_id]}"
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._owner[request_id] = slot
        self._slot_owner[slot] = request_id
        return slot

    def free(self, request_id: str) -> None:
        """Give back a request's slot (finish, abort, preemption: the state is recomputed)."""
        slot = self._owner.pop(request_id, None)
        if slot is None:
            return
        del self._slot_owner[slot]
        heapq.heappush(self._free, slot)

    def _move(self, src: int, dst: int) -> None:
        if not self.shape_only:
            self.buffer[dst].copy_(self.buffer[src])
        self.moved_bytes += self.slot_bytes

    # -- capacity --------------------------------------------------------------------------
    def can_resize(self, num_slots: int) -> bool:
        return num_slots >= self.num_live

    def resize(self, num_slots: int) -> int:
        """Grow or shrink to ``num_slots``; returns the bytes copied to compact live states."""
        assert self.can_resize(num_slots), f"cannot shrink to {num_slots} slots: {self.num_live} are live"
        before = self.moved_bytes
        if num_slots < self.num_slots:
            # Move live states above the new size into the lowest free slots below it.
            low_free = sorted(s for s in self._free if s < num_slots)
            for slot in sorted(s for s in self._slot_owner if s >= num_slots):
                dst = low_free.pop(0)
                rid = self._slot_owner.pop(slot)
                self._move(slot, dst)
                self._owner[rid] = dst
                self._slot_owner[dst] = rid
            self._free = [s for s in range(num_slots) if s not in self._slot_owner]
            heapq.heapify(self._free)
            if not self.shape_only:
                self.buffer = self.buffer[:num_slots].clone()
        elif num_slots > self.num_slots:
            for s in range(self.num_slots, num_slots):
                heapq.heappush(self._free, s)
            if not self.shape_only:
                grown = torch.zeros(num_slots, self.slot_bytes, dtype=torch.uint8, device=self.device)
                grown[:self.num_slots] = self.buffer
                self.buffer = grown
        self.num_slots = num_slots
        self._make_views()
        return self.moved_bytes - before

    def check_integrity(self) -> None:
        assert len(self._owner) == len(self._slot_owner), "owner maps disagree in size"
        for rid, slot in self._owner.items():
            assert 0 <= slot < self.num_slots, f"request {rid} holds slot {slot} outside [0, {self.num_slots})"
            assert self._slot_owner.get(slot) == rid, f"slot {slot} is not recorded as owned by {rid}"
        free = sorted(self._free)
        assert len(free) == len(set(free)), "a slot is free twice"
        assert set(free).isdisjoint(self._slot_owner), "a slot is both free and owned"
        assert len(free) + len(self._owner) == self.num_slots, \
            f"{len(free)} free + {len(self._owner)} live != {self.num_slots} slots"
        assert self.slot_bytes % STATE_ALIGN_BYTES == 0, "slot size is not 64-byte aligned"
        if not self.shape_only:
            assert tuple(self.buffer.shape) == (self.num_slots, self.slot_bytes), "buffer shape differs from slot count"
            assert len(self.conv) == len(self.ssm) == self.hybrid.num_ssm_layers, "one view per SSM layer expected"
