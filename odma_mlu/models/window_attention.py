"""Attention of sliding-window layers over their rings (odma_mlu/kvcache/window.py).

A ``RingBatch`` is planned once per step from the same ``SequenceInput``s as the
``ForwardBatch`` (same row order) plus each sequence's ring slot; every sliding layer then
runs ``ring_attention``::

    1. prefills (multi-token sequences): queries attend to the cached tokens still in the
       window (read from the ring, in position order) followed by the new K/V (not yet
       written), under the sliding causal mask  q - window < k <= q
    2. write: of each sequence's new tokens, only the last ``window`` are written, at ring
       index  slot * window + position % window  (the others would be overwritten anyway)
    3. decodes (one new token): each reads its whole ring as one [window] run; entries at or
       past the sequence's length (a short request's unused ring) are masked

Prefill reads before the write because a long chunk's own writes would overwrite cached
tokens its first queries still see. GQA folds the query heads of a KV head into the query
axis, as odma_mlu/models/attention.py does, so K/V are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from odma_mlu.kvcache.window import RingPool
from odma_mlu.models.attention import SequenceInput


@dataclass(frozen=True)
class RingPrefill:
    token_offset: int
    num_new_tokens: int
    cached_index: torch.Tensor | None
    """int64 [c]: flat ring rows of the cached tokens still in the window, oldest first."""
    mask: torch.Tensor
    """bool [new, c + new]: the sliding causal mask."""


@dataclass(frozen=True)
class RingBatch:
    """One step's ring reads and writes, shared by every sliding layer."""

    pool: RingPool
    write_rows: torch.Tensor
    """int64 [W]: rows (flattened batch) of the new tokens that stay in their ring."""
    write_index: torch.Tensor
    """int64 [W]: their flat ring rows."""
    prefills: tuple[RingPrefill, ...]
    decode_rows: torch.Tensor | None
    """int64 [B]: rows of the decoding sequences' new tokens."""
    decode_slots: torch.Tensor | None
    """int64 [B]: their ring slots."""
    decode_mask: torch.Tensor | None
    """bool [B, 1, 1, window]: ring entry j holds a token (j < min(length, window))."""

    @classmethod
    def build(cls, pool: RingPool, seqs: Sequence[SequenceInput], ring_slots: Sequence[int],
              device: torch.device | str = "cpu") -> "RingBatch":
        assert len(seqs) == len(ring_slots), f"{len(seqs)} sequences but {len(ring_slots)} ring slots"
        dev = torch.device(device)
        w = pool.window_tokens
        write_rows: list[torch.Tensor] = []
        write_index: list[torch.Tensor] = []
        prefills: list[RingPrefill] = []
        d_rows: list[int] = []
        d_slots: list[int] = []
        d_lengths: list[int] = []
        row = 0
        for seq, slot in zip(seqs, ring_slots):
            n, first, total = seq.num_new_tokens, seq.num_cached_tokens, seq.num_total_tokens
            assert 0 <= slot < pool.num_slots, f"ring slot {slot} outside the pool of {pool.num_slots}"
            keep_from = max(first, total - w)  # new tokens that remain in the window after this step
            write_rows.append(torch.arange(row + keep_from - first, row + n, dtype=torch.int64))
            write_index.append(slot * w + torch.arange(keep_from, total, dtype=torch.int64) % w)
            if n == 1:
                d_rows.append(row)
                d_slots.append(slot)
                d_lengths.append(total)
            else:
                cached_from = max(0, first - w + 1)  # the oldest key the first new query can see
                key_pos = torch.arange(cached_from, total, dtype=torch.int64)
                q_pos = torch.arange(first, total, dtype=torch.int64)
                mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] > q_pos[:, None] - w)
                cached = None
                if first > cached_from:
                    cached = (slot * w + torch.arange(cached_from, first, dtype=torch.int64) % w).to(dev)
                prefills.append(RingPrefill(row, n, cached, mask.to(dev)))
            row += n
        decode_rows = decode_slots = decode_mask = None
        if d_rows:
            decode_rows = torch.tensor(d_rows, dtype=torch.int64, device=dev)
            decode_slots = torch.tensor(d_slots, dtype=torch.int64, device=dev)
            valid = torch.tensor(d_lengths, dtype=torch.int64).clamp(max=w)
            decode_mask = (torch.arange(w)[None, :] < valid[:, None]).view(len(d_rows), 1, 1, w).to(dev)
        return cls(pool, torch.cat(write_rows).to(dev), torch.cat(write_index).to(dev), tuple(prefills),
                   decode_rows, decode_slots, decode_mask)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPrefill, scale: float) -> torch.Tensor:
    """q [n, H, D] over keys k/v [S, kv, D] under ``plan.mask`` [n, S] -> [n, H, D]."""
    n, heads, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[0]
    g = heads // kv_heads
    qg = q.view(n, kv_heads, g, dim).permute(1, 2, 0, 3)
    kg = k.transpose(0, 1)[:, None].expand(kv_heads, g, total, dim)
    vg = v.transpose(0, 1)[:, None].expand(kv_heads, g, total, dim)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=plan.mask, scale=scale)
    return out.permute(2, 0, 1, 3).reshape(n, heads, dim)


def ring_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, rings: RingBatch, ring_layer: int,
                   scale: float, out: torch.Tensor) -> None:
    """One sliding layer: attention of every new token ([T, H, D] queries, [T, kv, D] new
    K/V) over its window, written into ``out`` [T, H, D]; the ring is updated in place."""
    k_ring, v_ring = rings.pool.k[ring_layer], rings.pool.v[ring_layer]
    for plan in rings.prefills:
        rows = slice(plan.token_offset, plan.token_offset + plan.num_new_tokens)
        k, v = k_new[rows], v_new[rows]
        if plan.cached_index is not None:
            k = torch.cat([k_ring.index_select(0, plan.cached_index), k])
            v = torch.cat([v_ring.index_select(0, plan.cached_index), v])
        out[rows] = _prefill(q[rows], k, v, plan, scale)
    k_ring.index_copy_(0, rings.write_index, k_new.index_select(0, rings.write_rows))
    v_ring.index_copy_(0, rings.write_index, v_new.index_select(0, rings.write_rows))
    if rings.decode_rows is None:
        return
    assert rings.decode_slots is not None and rings.decode_mask is not None
    w = rings.pool.window_tokens
    b = int(rings.decode_rows.numel())
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_ring.shape[1]
    k = k_ring.view(-1, w, kv_heads, dim).index_select(0, rings.decode_slots).transpose(1, 2)  # [B, kv, w, D]
    v = v_ring.view(-1, w, kv_heads, dim).index_select(0, rings.decode_slots).transpose(1, 2)
    qg = q.index_select(0, rings.decode_rows).view(b, kv_heads, heads // kv_heads, dim)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=rings.decode_mask, scale=scale)
    out.index_copy_(0, rings.decode_rows, o.reshape(b, heads, dim))
