"""Attention of sliding-window layers over their rings (odma_mlu/kvcache/window.py).

A ``RingBatch`` is planned once per step and ring group from the same ``SequenceInput``s as
the ``ForwardBatch`` (same row order) plus each sequence's ring in that group (its runs of
arena slots, in ring order); a ``RingPlan`` holds the step's batches, one per group, and
the arena's lanes (the full layers' K/V tensors). Sliding layer ``j`` reads and writes
group ``j // lanes`` in lane ``j % lanes`` through ``ring_attention``. Token ``p`` of a
sequence is at ring index ``p % window``, i.e. the ``p % window``-th slot of its runs read
one after another (as many runs as the policy's pages or runs cut the ring into)::

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
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from odma_mlu.kvcache.window import RingPool, Run
from odma_mlu.models.attention import SequenceInput

RingRuns = tuple[Run, ...]
RingRef = Union[int, RingRuns]
"""A ring: its runs, or (legacy, fixed rings) an index r meaning the one run [r * window, (r + 1) * window)."""


def ring_slots(runs: RingRuns, ring_index: torch.Tensor) -> torch.Tensor:
    """Pool slots of ``ring_index`` (int64, < the ring's length) in a ring of ``runs``."""
    if len(runs) == 1:
        return ring_index + runs[0][0]
    table = torch.cat([torch.arange(s, s + n, dtype=torch.int64) for s, n in runs])
    return table[ring_index]


def _slot_of(runs: RingRuns, ring_index: int) -> int:
    for start, n in runs:
        if ring_index < n:
            return start + ring_index
        ring_index -= n
    raise AssertionError(f"ring index past the ring's runs {runs}")


@dataclass(frozen=True)
class RingPlan:
    """One step's rings: a ``RingBatch`` per ring group and the lanes they live in."""

    groups: tuple["RingBatch", ...]
    k: list[torch.Tensor]
    """The arena's per-lane K tensors (one per full-attention layer)."""
    v: list[torch.Tensor]

    def lane(self, sliding_layer: int) -> tuple["RingBatch", torch.Tensor, torch.Tensor]:
        """(the group's batch, K, V) of sliding layer ``sliding_layer`` (0-based among the sliding layers)."""
        lanes = len(self.k)
        return self.groups[sliding_layer // lanes], self.k[sliding_layer % lanes], self.v[sliding_layer % lanes]


@dataclass(frozen=True)
class RingPrefill:
    token_offset: int
    num_new_tokens: int
    cached_index: torch.Tensor | None
    """int64 [c]: pool slots of the cached tokens still in the window, oldest first."""
    mask: torch.Tensor
    """bool [new, c + new]: the sliding causal mask."""


@dataclass(frozen=True)
class RingBatch:
    """One step's ring reads and writes, shared by every sliding layer."""

    pool: RingPool
    """Anything with ``window_tokens`` and ``capacity_slots`` (the arena's slots)."""
    write_rows: torch.Tensor
    """int64 [W]: rows (flattened batch) of the new tokens that stay in their ring."""
    write_index: torch.Tensor
    """int64 [W]: their pool slots."""
    prefills: tuple[RingPrefill, ...]
    decode_rows: torch.Tensor | None
    """int64 [B]: rows of the decoding sequences' new tokens."""
    decode_index: torch.Tensor | None
    """int64 [B * L]: pool slots each decode reads, L = the batch's longest min(length, window)
    (entries past a sequence's own length point at slot 0 and are masked)."""
    decode_mask: torch.Tensor | None
    """bool [B, 1, 1, L]: entry j holds a token of the sequence (j < min(length, window))."""

    @classmethod
    def build(cls, pool: RingPool, seqs: Sequence[SequenceInput], rings: Sequence[RingRef],
              device: torch.device | str = "cpu") -> "RingBatch":
        assert len(seqs) == len(rings), f"{len(seqs)} sequences but {len(rings)} rings"
        dev = torch.device(device)
        w = pool.window_tokens
        write_rows: list[torch.Tensor] = []
        write_index: list[torch.Tensor] = []
        prefills: list[RingPrefill] = []
        d_rows: list[int] = []
        d_runs: list[RingRuns] = []
        d_lengths: list[int] = []
        d_write_slots: list[int] = []
        row = 0
        for seq, ring in zip(seqs, rings):
            runs: RingRuns = ((ring * w, w),) if isinstance(ring, int) else ring
            n, first, total = seq.num_new_tokens, seq.num_cached_tokens, seq.num_total_tokens
            held = sum(length for _, length in runs)
            assert runs and runs[-1][0] + runs[-1][1] <= pool.capacity_slots, f"ring {runs} outside the pool"
            assert held == w or (held <= w and total <= held), f"a ring of {held} slots cannot hold {total} tokens"
            if n == 1:  # its write joins the batch's one tensor of decode writes
                d_write_slots.append(_slot_of(runs, (total - 1) % w))
                d_rows.append(row)
                d_runs.append(runs)
                d_lengths.append(min(total, w))
            else:
                keep_from = max(first, total - w)  # new tokens that remain in the window after this step
                write_rows.append(torch.arange(row + keep_from - first, row + n, dtype=torch.int64))
                write_index.append(ring_slots(runs, torch.arange(keep_from, total, dtype=torch.int64) % w))
                cached_from = max(0, first - w + 1)  # the oldest key the first new query can see
                key_pos = torch.arange(cached_from, total, dtype=torch.int64)
                q_pos = torch.arange(first, total, dtype=torch.int64)
                mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] > q_pos[:, None] - w)
                cached = None
                if first > cached_from:
                    cached = ring_slots(runs, torch.arange(cached_from, first, dtype=torch.int64) % w).to(dev)
                prefills.append(RingPrefill(row, n, cached, mask.to(dev)))
            row += n
        decode_rows = decode_index = decode_mask = None
        if d_rows:
            write_rows.append(torch.tensor(d_rows, dtype=torch.int64))
            write_index.append(torch.tensor(d_write_slots, dtype=torch.int64))
            decode_rows = torch.tensor(d_rows, dtype=torch.int64, device=dev)
            decode_index, valid = _decode_index(d_runs, d_lengths)
            decode_index, decode_mask = decode_index.to(dev), valid.view(len(d_rows), 1, 1, -1).to(dev)
        return cls(pool, torch.cat(write_rows).to(dev), torch.cat(write_index).to(dev), tuple(prefills),
                   decode_rows, decode_index, decode_mask)


def _decode_index(runs: list[RingRuns], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool slots [B * L], valid [B, L]) of the decodes' ring entries [0, length), with
    tensor ops over the batch (no per-entry Python): entry j of a ring is in the run whose
    ring offset is the last one <= j."""
    b, longest, most_runs = len(runs), max(lengths), max(len(r) for r in runs)
    starts = torch.zeros(b, most_runs, dtype=torch.int64)
    offsets = torch.full((b, most_runs), 1 << 40, dtype=torch.int64)  # unused runs: never chosen
    for i, ring in enumerate(runs):
        off = 0
        for k, (start, n) in enumerate(ring):
            starts[i, k], offsets[i, k] = start, off
            off += n
    j = torch.arange(longest, dtype=torch.int64)
    run_of = (j[None, :, None] >= offsets[:, None, :]).sum(-1) - 1  # [B, L]
    slots = starts.gather(1, run_of) + j[None, :] - offsets.gather(1, run_of)
    valid = j[None, :] < torch.tensor(lengths, dtype=torch.int64)[:, None]
    return torch.where(valid, slots, torch.zeros_like(slots)).reshape(-1), valid


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
                   scale: float, out: torch.Tensor) -> None:
    """Sliding layer ``sliding_layer``: attention of every new token ([T, H, D] queries,
    [T, kv, D] new K/V) over its window, written into ``out`` [T, H, D]; the ring is updated
    in place (its group's slots of its lane)."""
    rings, k_ring, v_ring = plan.lane(sliding_layer)
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
    assert rings.decode_index is not None and rings.decode_mask is not None
    b = int(rings.decode_rows.numel())
    span = rings.decode_mask.shape[-1]
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_ring.shape[1]
    k = k_ring.index_select(0, rings.decode_index).view(b, span, kv_heads, dim).transpose(1, 2)  # [B, kv, L, D]
    v = v_ring.index_select(0, rings.decode_index).view(b, span, kv_heads, dim).transpose(1, 2)
    qg = q.index_select(0, rings.decode_rows).view(b, kv_heads, heads // kv_heads, dim)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=rings.decode_mask, scale=scale)
    out.index_copy_(0, rings.decode_rows, o.reshape(b, heads, dim))
