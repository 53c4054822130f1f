"""The physical KV store: per layer, one K and one V tensor indexed by token slot.

::

    k[layer]: [capacity_tokens, num_kv_heads, head_dim]     (v[layer] alike)
                 slot 0 ......................... capacity-1
    request A:   [=====A=====)                               one contiguous slot range
    request B:                 [=========B=========)         in every layer, K and V

A contiguous policy gives each request one slot range ``[start, start + capacity)``; the
paged policy gives pages of ``page_tokens`` slots listed in a block table. Either way a
request's token ``t`` lives at one slot (``KVLocation.slot_of``), the same in every layer.
Per-layer tensors (not one big tensor) keep each under torch_mlu's 2^31-byte cap per K/V.

``shape_only=True`` keeps the accounting without tensors (7B-scale replay on a laptop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from odma_mlu.config import ModelSpec


@dataclass(frozen=True)
class KVLocation:
    """Where a request's KV lives: a contiguous range, or a block table of pages."""

    capacity_tokens: int
    start_slot: int | None = None
    block_table: tuple[int, ...] | None = None
    page_tokens: int = 0

    def __post_init__(self) -> None:
        assert (self.start_slot is None) != (self.block_table is None), "exactly one of start_slot / block_table"

    @property
    def is_contiguous(self) -> bool:
        return self.start_slot is not None

    def slot_of(self, token_index: int) -> int:
        assert 0 <= token_index < self.capacity_tokens, \
            f"token {token_index} outside the reservation of {self.capacity_tokens} tokens"
        if self.start_slot is not None:
            return self.start_slot + token_index
        assert self.block_table is not None
        page, offset = divmod(token_index, self.page_tokens)
        return self.block_table[page] * self.page_tokens + offset

    def slots(self, first: int, count: int) -> torch.Tensor:
        """Slot indices of tokens [first, first + count) as an int64 tensor (CPU)."""
        if self.start_slot is not None:
            assert first + count <= self.capacity_tokens, "slots past the reservation"
            return torch.arange(self.start_slot + first, self.start_slot + first + count, dtype=torch.int64)
        return torch.tensor([self.slot_of(t) for t in range(first, first + count)], dtype=torch.int64)


class KVArena:
    """Token-slot KV tensors for every layer, or only their accounting (``shape_only``)."""

    def __init__(self, model: ModelSpec, capacity_tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float16, shape_only: bool = False) -> None:
        assert capacity_tokens > 0, "arena capacity must be positive"
        self.model = model
        self.capacity_tokens = int(capacity_tokens)
        self.shape_only = shape_only
        self.dtype = dtype
        self.device = torch.device(device)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        if not shape_only:
            shape = (self.capacity_tokens, model.num_kv_heads, model.head_dim)
            for _ in range(model.num_layers):
                self.k.append(torch.zeros(shape, dtype=dtype, device=self.device))
                self.v.append(torch.zeros(shape, dtype=dtype, device=self.device))
        self.moved_bytes = 0

    @property
    def bytes_per_token(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.model.num_layers * self.model.num_kv_heads * self.model.head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.capacity_tokens * self.bytes_per_token

    def move(self, src_slots: torch.Tensor | range, dst_slots: torch.Tensor | range) -> int:
        """Copy KV from ``src_slots`` to ``dst_slots`` in every layer; returns bytes moved.

        Ranges copy as one contiguous slice per layer and K/V (ODMA's migration);
        index tensors (paged) gather and scatter.
        """
        n = len(src_slots)
        assert n == len(dst_slots), "move: source and destination differ in length"
        nbytes = n * self.bytes_per_token
        self.moved_bytes += nbytes
        if self.shape_only or n == 0:
            return nbytes
        if isinstance(src_slots, range) and isinstance(dst_slots, range):
            s, d = slice(src_slots.start, src_slots.stop), slice(dst_slots.start, dst_slots.stop)
            overlap = src_slots.start < dst_slots.stop and dst_slots.start < src_slots.stop
            for t in (*self.k, *self.v):
                t[d] = t[s].clone() if overlap else t[s]
            return nbytes
        src = torch.as_tensor(list(src_slots) if isinstance(src_slots, range) else src_slots, device=self.device)
        dst = torch.as_tensor(list(dst_slots) if isinstance(dst_slots, range) else dst_slots, device=self.device)
        for t in (*self.k, *self.v):
            t[dst] = t[src]
        return nbytes
