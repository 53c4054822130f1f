"""Decodes read in parts: each of a multi-run decode's runs of at least the view length read
in place, its other runs as one gathered part, and the parts merged by their log-sum-exps.

A decode whose KV lies in several runs is otherwise gathered whole every step: its runs read,
written to the step's gather buffer and read back (``models/attention.py``). Read in parts,
each long run is read once where it lies, as a view (one attention call each, which also
returns each query's log-sum-exp, LSE), and the step pays one merge a layer for all such
decodes: for sequence s with parts p, out_s = sum_p softmax_p(lse_sp) * out_sp, the
flash-decoding identity, exact up to rounding. ``step_work.ViewRule`` (``split_gain``,
``splits_pay``) decides which decodes (the one rule ``StepWork.build`` prices);
``ForwardBatch.build`` plans them here and ``arena_attention`` calls ``split_attention`` once
a layer. A part is one kernel where the device has a flash kernel that returns the LSE (CPU;
CUDA or MLU where ``fused_lse_works``), else ``PLAIN_LSE_KERNELS`` plain ops, and the engine
prices it so (``ViewRule.part_calls``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from odma_mlu.models.attention import SequenceInput


@dataclass(frozen=True)
class SplitReads:
    """The step's decodes read in parts (``ViewRule.split_gain``), attended part by part and
    merged by the parts' log-sum-exps, once a layer for all of them (``split_attention``).
    Part ``p`` of sequence ``s`` is entry ``p * S + s`` of ``parts`` (S = ``num_seqs``)::

        parts:  | s0 run 1 | s1 run 1 | s0 run 3 | s1 rest | s0 rest | None |   (P = 3, S = 2)
                  in place   in place   in place   gathered  gathered  filler

    A part is (source, start, tokens): source 0 reads slots start..start+tokens of the arena
    in place (a view), source 1 rows start..start+tokens of the step's gather buffer (the
    sequence's runs shorter than the view length, in any order: attention is a sum over keys).
    None pads a sequence with fewer than P parts; it weighs nothing (``filler_lse``)."""

    first_row: int
    """Row of the first one's new token: the S rows are consecutive, after the decode groups'."""
    num_seqs: int
    num_parts: int
    """P: the most parts any of them has."""
    parts: tuple[tuple[int, int, int] | None, ...]
    filler_lse: torch.Tensor | None
    """float32 [1, 1, 1] -inf where any part is None (expanded to a part's LSE shape), else None."""

    @property
    def rows(self) -> slice:
        return slice(self.first_row, self.first_row + self.num_seqs)


def plan_split_reads(first_row: int, members: "list[SequenceInput]", view_min_tokens: int | None,
                      gather_offset: int, dev: torch.device) -> tuple[SplitReads | None, list[torch.Tensor]]:
    """The parts of the decodes read in parts, whose rows start at ``first_row``: each run of
    at least ``view_min_tokens`` in place, the others as one part gathered at rows from
    ``gather_offset`` of the step's gather buffer; returns the plan and those parts' slots (CPU)."""
    if not members:
        return None, []
    assert view_min_tokens is not None
    per_seq: list[list[tuple[int, int, int]]] = []
    rest_slots: list[torch.Tensor] = []
    for seq in members:
        parts: list[tuple[int, int, int]] = []
        rest: list[torch.Tensor] = []
        loc = seq.location
        for (start, _), take in zip(loc.runs, loc.run_tokens(seq.num_total_tokens)):  # the runs its read covers
            if take >= view_min_tokens:
                parts.append((0, start, take))
            else:
                rest.append(torch.arange(start, start + take, dtype=torch.int64))
        if rest:
            slots = rest[0] if len(rest) == 1 else torch.cat(rest)
            parts.append((1, gather_offset, int(slots.numel())))
            gather_offset += int(slots.numel())
            rest_slots.append(slots)
        per_seq.append(parts)
    num_parts = max(len(p) for p in per_seq)
    grid = tuple(p[j] if j < len(p) else None for j in range(num_parts) for p in per_seq)
    filler = torch.full((1, 1, 1), float("-inf"), dtype=torch.float32).to(dev) if None in grid else None
    return SplitReads(first_row, len(members), num_parts, grid, filler), rest_slots


def split_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_gathered: torch.Tensor | None,
                    v_gathered: torch.Tensor | None, split: SplitReads, scale: float) -> torch.Tensor:
    """Attention of the decodes read in parts ([S, H, D] queries): one call a part, each over a
    view of its run (or of its slice of the gather buffer), returning its output and its
    log-sum-exp; then, for all of them at once, each part weighted by softmax over its
    sequence's parts' log-sum-exps (a filler's -inf weighs 0) and the parts summed -> [S, H, D]."""
    num_seqs, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    g = heads // kv_heads
    qg = q.view(num_seqs, kv_heads, g, dim)
    fused = has_fused_lse(q.device.type, q.dtype, dim)  # once a layer, not once a part
    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    for i, part in enumerate(split.parts):
        s = i % num_seqs
        if part is None:  # weighs exp(-inf) = 0: any finite output will do, its sequence's first part's
            assert split.filler_lse is not None
            outs.append(outs[s])
            lses.append(split.filler_lse.expand(1, kv_heads, g))
            continue
        source, start, tokens = part
        k_src, v_src = (k_cache, v_cache) if source == 0 else (k_gathered, v_gathered)
        assert k_src is not None and v_src is not None, "a gathered part needs the step's gather"
        k = k_src[start:start + tokens].unsqueeze(0).transpose(1, 2)  # [1, kv, n, D], a view
        v = v_src[start:start + tokens].unsqueeze(0).transpose(1, 2)
        out, lse = attention_with_lse(qg[s:s + 1], k, v, scale, fused)
        outs.append(out)
        lses.append(lse)
    shape = (split.num_parts, num_seqs, kv_heads, g)
    weights = torch.softmax(torch.cat(lses).view(shape), dim=0)  # float32
    out = (torch.cat(outs).view(*shape, dim) * weights.unsqueeze(-1)).sum(0, dtype=q.dtype)
    return out.view(num_seqs, heads, dim)


PLAIN_LSE_KERNELS = 8
"""Ops a part issues without a fused kernel (``attention_with_lse``'s plain ops in half
precision: two batched matmuls, two casts, the scale, logsumexp, a subtraction and exp;
six in float32), counted in tests/test_split_reads.py: what the engine prices a part at on
such a device (``LLMEngine.views``)."""


def has_fused_lse(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a flash kernel that returns its log-sum-exp takes queries of ``dtype`` and
    ``head_dim`` on ``device_type``: on CPU the one SDPA runs; elsewhere (CUDA, MLU) the
    device's ``_scaled_dot_product_flash_attention``, where a probe finds it gives the plain
    ops' output and log-sum-exp (``fused_lse_works``)."""
    return device_type == "cpu" or fused_lse_works(device_type, dtype, head_dim)


@functools.lru_cache(maxsize=None)
def fused_lse_works(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Probe once per device, dtype and head dim: the fused kernel over a strided view of an
    arena-shaped K/V gives what the plain ops give (output and log-sum-exp, to half
    precision's tolerance). False where it raises (no kernel, dtype or shape it refuses) or
    differs: the parts then run in plain ops, and the engine prices them so."""
    try:
        gen = torch.Generator().manual_seed(0)
        cache = torch.randn(64, 2, head_dim, generator=gen).to(device=device_type, dtype=dtype)
        q = torch.randn(1, 2, 3, head_dim, generator=gen).to(device=device_type, dtype=dtype)
        k = cache[5:42].unsqueeze(0).transpose(1, 2)
        v = cache[9:46].unsqueeze(0).transpose(1, 2)
        fused = attention_with_lse(q, k, v, head_dim ** -0.5, fused=True)
        plain = attention_with_lse(q, k, v, head_dim ** -0.5, fused=False)
        return (fused[0].shape == plain[0].shape and fused[1].shape == plain[1].shape
                and torch.allclose(fused[0].float(), plain[0].float(), atol=5e-3, rtol=5e-3)
                and torch.allclose(fused[1], plain[1], atol=5e-3, rtol=5e-3))
    except Exception:  # a capability probe: any failure (no device, kernel, dtype or shape) means no
        return False


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries [1, kv, g, D] over K/V [1, kv, n, D] (views are fine) -> (output
    [1, kv, g, D], float32 log-sum-exp of each query's scaled scores [1, kv, g]). ``fused``
    (default: ``has_fused_lse``) calls the flash kernel SDPA runs, which returns its LSE (one
    op: ``_scaled_dot_product_flash_attention_for_cpu`` on CPU, elsewhere
    ``_scaled_dot_product_flash_attention``, whose LSE may be padded along the queries
    (torch_mlu pads to 16): only the first g are read; NOT yet run on a GPU or an MLU);
    otherwise the same in plain ops (``PLAIN_LSE_KERNELS``)."""
    if fused if fused is not None else has_fused_lse(q.device.type, q.dtype, q.shape[-1]):
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
            if lse.shape[-1] != q.shape[-2]:  # padded along the queries
                lse = lse.narrow(-1, 0, q.shape[-2])
        return out, lse
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype), v), lse
