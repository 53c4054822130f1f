"""Attention of sliding-window layers over their rings (odma_mlu/kvcache/window.py).

A ``RingBatch`` is planned once per step from the step's ``ForwardBatch`` (its sequences
and the rows it laid them out at) plus each sequence's ring (the ring request's location and
its ring slots); it holds, for every sliding layer at once, the flat slots (lane within the
layer's lane group * capacity + arena slot) each layer reads and writes: index tensors of
shape [S, ...], row ``j`` for sliding layer ``j``. A ``RingPlan`` holds the batch and the
arena's flat K/V tensors, one per lane group (lane-major); layer ``j`` indexes group
``RingPool.group_of(j)``'s. Token ``p`` of a sequence is at ring index ``p % window``; sliding layer
``j``'s ring index ``i`` is at ``RingPool.flat_slots`` (block ``i // B`` of layer ``j`` is
cell ``(i // B) S + j``: lane and row-block from it, the row through the location)::

    1. prefills (multi-token sequences): queries attend to the cached tokens still in the
       window (read from the ring, in position order) followed by the new K/V (not yet
       written), under the sliding causal mask  q - window < k <= q
    2. write: of each sequence's new tokens, only the last ``window`` are written, at their
       ring index's slot (the others would be overwritten anyway)
    3. decodes (one new token): each gathers ring indices [0, min(length, window)) -- every
       entry it holds, in ring order -- padded to the batch's longest and masked past its own

Prefill reads before the write because a long chunk's own writes would overwrite cached
tokens its first queries still see. Attention does not care about key order (rotary is
applied before the write). GQA folds the query heads of a KV head into the query axis, as
odma_mlu/models/attention.py does, so K/V are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.kvcache.window import RingPool
from odma_mlu.models.attention import ForwardBatch

RingRef = tuple[KVLocation, int]
"""A sequence's ring: the ring request's location and the ring slots it holds (per layer)."""


@dataclass(frozen=True)
class RingPlan:
    """One step's rings: the ``RingBatch`` and the flat K/V tensors its slots index."""

    batch: "RingBatch"
    k: tuple[torch.Tensor, ...]
    """The arena's flat K tensors, one per lane group [lanes * capacity, kv_heads, head_dim]
    (``KVArena.k_groups``); sliding layer j's slots index ``k[batch.pool.group_of(j)]``."""
    v: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class RingPrefill:
    token_offset: int
    num_new_tokens: int
    cached_index: torch.Tensor | None
    """int64 [S, c]: per sliding layer, flat slots of the cached tokens still in the window, oldest first."""
    mask: torch.Tensor
    """bool [new, c + new]: the sliding causal mask."""


@dataclass(frozen=True)
class RingBatch:
    """One step's ring reads and writes, for every sliding layer (row ``j`` of each index)."""

    pool: RingPool
    write_rows: torch.Tensor
    """int64 [W]: rows (flattened batch) of the new tokens that stay in their ring."""
    write_index: torch.Tensor
    """int64 [S, W]: their flat slots, per sliding layer."""
    prefills: tuple[RingPrefill, ...]
    """In row order: the ``ForwardBatch`` lays every prefill's rows out first."""
    decode_rows: slice | None
    """The decoding sequences' rows (``ForwardBatch.decode_rows``); the decode index below
    follows them in row order."""
    decode_index: torch.Tensor | None
    """int64 [S, B * L]: flat slots each decode reads, L = the batch's longest min(length,
    window) (entries past a sequence's own length point at slot 0 and are masked)."""
    decode_mask: torch.Tensor | None
    """bool [B, 1, 1, L]: entry j holds a token of the sequence (j < min(length, window))."""

    @classmethod
    def build(cls, pool: RingPool, batch: ForwardBatch, rings: Sequence[RingRef],
              device: torch.device | str = "cpu") -> "RingBatch":
        """``rings[i]``: the ring of ``batch.seqs[i]``, whose new tokens are at rows from
        ``batch.seq_rows[i]``."""
        seqs = batch.seqs
        assert len(seqs) == len(rings), f"{len(seqs)} sequences but {len(rings)} rings"
        dev = torch.device(device)
        w, layers = pool.window_tokens, pool.num_layers
        write_rows: list[torch.Tensor] = []
        write_index: list[torch.Tensor] = []
        prefills: list[RingPrefill] = []
        reads: list[torch.Tensor] = []  # each decode's ring slots [S, length], in row order
        num_prefills = len(batch.prefill_seqs)
        for k, i in enumerate(batch.prefill_seqs + batch.decode_seqs):  # row order
            seq, (loc, held), row = seqs[i], rings[i], batch.seq_rows[i]
            n, first, total = seq.num_new_tokens, seq.num_cached_tokens, seq.num_total_tokens
            assert held == w or (held <= w and total <= held), f"a ring of {held} slots cannot hold {total} tokens"
            assert loc.capacity_tokens >= pool.rows_for(held), f"ring location {loc} holds fewer rows than {held} slots"
            if k >= num_prefills:  # a decode: its write joins the decode writes
                read = pool.flat_slots(loc, torch.arange(min(total, w), dtype=torch.int64))  # [S, length]
                reads.append(read)
                write_rows.append(torch.tensor([row], dtype=torch.int64))
                write_index.append(read[:, (total - 1) % w, None])
            else:
                keep_from = max(first, total - w)  # new tokens that remain in the window after this step
                write_rows.append(torch.arange(row + keep_from - first, row + n, dtype=torch.int64))
                write_index.append(pool.flat_slots(loc, torch.arange(keep_from, total, dtype=torch.int64) % w))
                cached_from = max(0, first - w + 1)  # the oldest key the first new query can see
                key_pos = torch.arange(cached_from, total, dtype=torch.int64)
                q_pos = torch.arange(first, total, dtype=torch.int64)
                mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] > q_pos[:, None] - w)
                cached = None
                if first > cached_from:
                    cached = pool.flat_slots(loc, torch.arange(cached_from, first, dtype=torch.int64) % w).to(dev)
                prefills.append(RingPrefill(row, n, cached, mask.to(dev)))
        decode_rows = decode_index = decode_mask = None
        if reads:
            b, lengths = len(reads), [read.shape[1] for read in reads]
            longest = max(lengths)
            index = torch.zeros(layers, b, longest, dtype=torch.int64)
            for j, read in enumerate(reads):
                index[:, j, :read.shape[1]] = read
            valid = torch.arange(longest)[None, :] < torch.tensor(lengths, dtype=torch.int64)[:, None]
            decode_rows = batch.decode_rows
            decode_index = index.view(layers, b * longest).to(dev)
            decode_mask = valid.view(b, 1, 1, longest).to(dev)
        return cls(pool, torch.cat(write_rows).to(dev), torch.cat(write_index, dim=1).to(dev), tuple(prefills),
                   decode_rows, decode_index, decode_mask)


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


def ring_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, plan: RingPlan, sliding_layer: int,
                   scale: float) -> torch.Tensor:
    """Sliding layer ``sliding_layer``: attention of every new token ([T, H, D] queries,
    [T, kv, D] new K/V) over its window -> [T, H, D] in row order (the prefills' outputs,
    then the decodes', concatenated: the ``ForwardBatch`` row layout); the ring is updated
    in place (the layer's flat slots, in whichever lanes its blocks lie)."""
    rings, j = plan.batch, sliding_layer
    group = rings.pool.group_of(j)
    k_flat, v_flat = plan.k[group], plan.v[group]
    parts = []
    for pre in rings.prefills:
        rows = slice(pre.token_offset, pre.token_offset + pre.num_new_tokens)
        k, v = k_new[rows], v_new[rows]
        if pre.cached_index is not None:
            k = torch.cat([k_flat.index_select(0, pre.cached_index[j]), k])
            v = torch.cat([v_flat.index_select(0, pre.cached_index[j]), v])
        parts.append(_prefill(q[rows], k, v, pre, scale))
    k_flat.index_copy_(0, rings.write_index[j], k_new.index_select(0, rings.write_rows))
    v_flat.index_copy_(0, rings.write_index[j], v_new.index_select(0, rings.write_rows))
    if rings.decode_rows is not None:
        parts.append(_decode(q[rings.decode_rows], k_flat, v_flat, rings, j, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _decode(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, rings: RingBatch, j: int,
            scale: float) -> torch.Tensor:
    """The decodes' queries [B, H, D] over the ring entries they hold -> [B, H, D]."""
    assert rings.decode_index is not None and rings.decode_mask is not None
    b = q.shape[0]
    span = rings.decode_mask.shape[-1]
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_flat.shape[1]
    k = k_flat.index_select(0, rings.decode_index[j]).view(b, span, kv_heads, dim).transpose(1, 2)  # [B, kv, L, D]
    v = v_flat.index_select(0, rings.decode_index[j]).view(b, span, kv_heads, dim).transpose(1, 2)
    qg = q.reshape(b, kv_heads, heads // kv_heads, dim)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=rings.decode_mask, scale=scale)
    return o.reshape(b, heads, dim)
