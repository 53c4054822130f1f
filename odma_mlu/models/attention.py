"""One forward step's batch description and attention over the KV arena.

A step runs prefill sequences (many new tokens) and decode sequences (one new token)
together. Their new tokens are flattened into one varlen row space, laid out by attention
call: every prefill's rows first (in ``seqs`` order), then each decode group's rows
together (``ForwardBatch.seq_rows`` says where each sequence went). A decode is one new
token after cached ones; a one-token prompt is a prefill, as the scheduler counts it::

    seqs:      A (prefill 5)  B (decode)  C (decode)  D (prefill 3)  E (decode)
    rows:      0 1 2 3 4 | 5 6 7 | 8   | 9 10
    sequence:  A A A A A | D D D | C   | B  E     D had 3 tokens cached (chunked prefill)
    position:  0 1 2 3 4 | 3 4 5 | 900 |41  9     C: one run past the view length, read alone;
                                                  B, E: one span class, one gathered call

So each attention call reads its queries as one slice of the rows (a view) and the calls'
outputs, concatenated in call order, are the layer's attention output in row order: one
``cat`` per layer, no gather of query rows and no scatter of output rows per call.
Row-wise work (matmuls, norms, rotary) does not care about the order; the logits come
back in ``seqs`` order through ``last_token_rows``.

Token ``t`` of a sequence lives at ``location.slot_of(t)`` in every layer's
``arena.k[layer]`` / ``arena.v[layer]`` ([capacity_tokens, kv_heads, head_dim]). Each step
first scatters the new K/V to ``write_slots`` (one index_copy per layer), then attends.

Every sequence's KV is an ordered list of runs (``KVLocation``). Decode sequences are
batched into attention groups by ``odma_mlu.engine.step_work.decode_group_key`` (the one
place grouping is decided; the step-cost function counts the same groups)::

    one run of >= the view length ->  a group of its own, read as below
    alone in its group, one run   ->  k[l][s : s + L], a view: nothing is copied
    several runs, in parts        ->  its runs of >= the view length each a view, the others
      (``ViewRule``: ``split_gain``,  one part in the step's gather; one attention call a
      ``splits_pay``)                 part returns its log-sum-exp, and one merge a layer
                                      weighs every split read's parts (``SplitReads``)
    any other group               ->  its B x L slots, in the step's one gather per layer

``L`` is the longest sequence in the group (its members' contexts differ by less than a
span class's step, an eighth of the next power of two), and a length mask hides each
shorter sequence's tail. The gathered groups' slots are laid end to end
(``ForwardBatch.decode_gather_slots``), so a layer gathers K and V once for all of them and
each group reads its slice of the buffer::

    gather buffer:  | group 1: B1 x L1 slots | group 2: B2 x L2 slots | ...
                      ^ gather_offset 0        ^ gather_offset B1 x L1

Every path but the split reads feeds the same SDPA call, so they give identical results;
a split read's parts run a kernel that also returns each query's log-sum-exp, or the same in
plain ops (``split_reads.py``), and softmax over the parts' log-sum-exps weighs their outputs,
which is exact up to rounding. A device kernel that reads runs in place (vendor paged attention with
consecutive block ids, or a run-aware kernel) replaces the gather without changing the
description.

GQA: the ``g = heads / kv_heads`` query heads sharing a KV head are folded into the query
axis ([B, kv, g, D] against [B, kv, L, D]), so K/V are never repeated, and the code needs no
``enable_gqa`` (absent from torch 2.4, which torch_mlu pairs with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from odma_mlu.engine.step_work import MIN_SPAN_TOKENS, SPAN_CLASSES_PER_OCTAVE, ViewRule, decode_group_key
from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.models.split_reads import SplitReads, plan_split_reads, split_attention

_SPAN_STEP_DIVISOR = 2 * SPAN_CLASSES_PER_OCTAVE  # decode_group_key's, for its inlined copy in build


@dataclass(frozen=True)
class SequenceInput:
    """One sequence's part of a forward step.

    ``num_cached_tokens`` is the position of the first new token: 0 for a fresh prompt or a
    recompute after preemption, > 0 for decode and for later chunks of a chunked prefill.
    """

    token_ids: tuple[int, ...]
    num_cached_tokens: int
    location: KVLocation

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_total_tokens(self) -> int:
        return self.num_cached_tokens + len(self.token_ids)


@dataclass(frozen=True)
class PrefillPlan:
    """Attention of one multi-token sequence: causal over its cached + new tokens."""

    token_offset: int
    """Row of its first new token in the flattened batch."""
    num_new_tokens: int
    num_total_tokens: int
    start_slot: int | None
    """One run: tokens [0, total) are slots start..start+total (read as a view)."""
    kv_slots: torch.Tensor | None
    """Several runs: slot of each token [0, total), int64 [total]."""
    mask: torch.Tensor | None
    """Bool [new, total] when tokens were cached before (chunked prefill); None = plain causal."""


@dataclass(frozen=True)
class DecodeGroup:
    """Single-token sequences attended as one batched SDPA over [B, L] KV."""

    first_row: int
    """Row of its first sequence's new token: the group's B rows are consecutive."""
    num_seqs: int
    """B."""
    span_tokens: int
    """L: tokens read per sequence, the longest length in the group."""
    length_mask: torch.Tensor | None
    """bool [B, 1, 1, L]: token j of sequence b is real (j < its length); None for a view.
    A slice of one tensor holding every gathered group's mask, uploaded once a step."""
    view_start: int | None
    """B = 1 and one run: the run starts here and is read as a view."""
    gather_offset: int | None
    """Otherwise: its B * L slots start at this row of the step's gather buffer
    (``ForwardBatch.decode_gather_slots``); padding repeats a valid slot and is masked."""

    @property
    def rows(self) -> slice:
        return slice(self.first_row, self.first_row + self.num_seqs)


@dataclass(frozen=True)
class ForwardBatch:
    """Everything one forward step needs, built once and shared by every layer."""

    seqs: tuple[SequenceInput, ...]
    input_ids: torch.Tensor
    """int64 [T], all sequences' new tokens flattened in ``seqs`` order."""
    positions: torch.Tensor
    """int64 [T], each token's position in its sequence (rotary index)."""
    write_slots: torch.Tensor
    """int64 [T], arena slot each new token's K/V is written to."""
    last_token_rows: torch.Tensor
    """int64 [S], row of each sequence's last new token: the logits returned."""
    prefills: tuple[PrefillPlan, ...]
    decode_groups: tuple[DecodeGroup, ...]
    seq_rows: tuple[int, ...]
    """Row of each sequence's first new token, in ``seqs`` order (its tokens' rows are
    consecutive)."""
    prefill_seqs: tuple[int, ...]
    """Indices into ``seqs`` of the prefills, in row order (their rows come first)."""
    decode_seqs: tuple[int, ...]
    """Indices into ``seqs`` of the decodes, in row order: rows ``decode_rows``, one each.
    Ring plans and SSM mixers read the split from here rather than deciding it again."""
    max_position: int = -1
    """The largest position in the batch (rotary tables grow to it); -1: compute it."""
    decode_gather_slots: torch.Tensor | None = None
    """int64 [sum of B * L + gathered parts]: every gathered decode group's slots, end to end
    in group order (``DecodeGroup.gather_offset``), then the split reads' gathered parts;
    None when nothing is gathered."""
    split_reads: SplitReads | None = None
    """The decodes read in parts, after the decode groups in row order; None: none this step."""

    @property
    def decode_rows(self) -> slice:
        """The decodes' rows: consecutive, after every prefill's."""
        return slice(self.num_tokens - len(self.decode_seqs), self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @classmethod
    def build(cls, seqs: Sequence[SequenceInput], device: torch.device | str = "cpu",
              views: ViewRule | None = None) -> "ForwardBatch":
        """Flatten ``seqs`` and plan their attention; metadata tensors land on ``device``.
        ``views``: a decode in one run at least its view length is read alone, in place, and
        one in several runs may be read in parts (``StepWork.build``'s rule; None: only a
        decode alone in its span class is a view, and nothing is split).

        Host work is O(1) Python per decode sequence (a few list appends; each decode group is
        then planned with a handful of tensor ops over the whole group) and O(chunk) per
        prefill; a multi-run location's slot table is built once per location and reused
        (``location_slots``); with ``views``, a decode past its first run whose location has
        a run of the view length also walks its runs (``ViewRule.split_gain``)."""
        assert len(seqs) > 0, "a forward batch needs at least one sequence"
        dev = torch.device(device)
        view_min_tokens = views.min_tokens if views is not None else None
        prefill_seqs: list[int] = []
        multi: list[int] = []  # decodes whose newest token is past their first run
        groups: dict[int, list[int]] = {}
        max_total = 0
        for i, seq in enumerate(seqs):  # which attention call each sequence joins
            n, first, loc = len(seq.token_ids), seq.num_cached_tokens, seq.location
            total = first + n
            if total > max_total:
                max_total = total
            if n == 1 and 0 < first < loc.runs[0][1]:  # the common decode: its newest token in the first run
                if view_min_tokens is not None and first >= view_min_tokens - 1:  # one run, long: its own group
                    groups[-1 - i] = [i]
                else:  # decode_group_key(total), inlined (hot path)
                    step = (1 << first.bit_length()) // _SPAN_STEP_DIVISOR or 1
                    key = -(-total // step) * step
                    groups.setdefault(key if key > MIN_SPAN_TOKENS else MIN_SPAN_TOKENS, []).append(i)
                continue
            assert n > 0, "a sequence in a forward batch needs at least one new token"
            assert first >= 0, f"negative cached token count {first}"
            assert total <= loc.capacity_tokens, (
                f"{total} tokens do not fit the reservation of {loc.capacity_tokens}")
            if n == 1 and first > 0:  # its newest token is past its first run: in parts, or a group's slot table
                multi.append(i)
            else:  # a prompt or a chunk of one (a one-token prompt too: the scheduler prefills it)
                prefill_seqs.append(i)
        split: list[int] = []
        if multi and views is not None:  # StepWork.build's rule, over the same runs
            # (a location with no run that long gains nothing: skip walking its runs, often pages)
            long = [i for i in multi if seqs[i].location.longest_run_tokens() >= views.min_tokens]
            gains = [views.split_gain(seqs[i].location.run_tokens(seqs[i].num_total_tokens)) for i in long]
            if views.splits_pay(gains):
                split = [i for i, g in zip(long, gains) if g > 0]
        chosen = set(split)
        joined = set()
        for i in multi:
            if i not in chosen:
                key = decode_group_key(seqs[i].num_total_tokens)
                groups.setdefault(key, []).append(i)
                joined.add(key)
        for key in joined:  # members in ``seqs`` order, as the others joined
            groups[key].sort()
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_rows = [0] * len(seqs)
        prefills: list[PrefillPlan] = []
        for i in prefill_seqs:  # rows in call order: the prefills, then each decode group
            seq = seqs[i]
            n, first, loc = len(seq.token_ids), seq.num_cached_tokens, seq.location
            total = first + n
            start, first_run = loc.runs[0]
            seq_rows[i] = len(ids)
            ids.extend(seq.token_ids)
            positions.extend(range(first, total))
            one_run = total <= first_run
            kv_slots = None if one_run else location_slots(loc)[:total]
            slots.extend(range(start + first, start + total) if kv_slots is None else kv_slots[first:].tolist())
            mask = None
            if first > 0:
                q_pos = torch.arange(first, total, dtype=torch.int64)
                mask = (torch.arange(total, dtype=torch.int64)[None, :] <= q_pos[:, None]).to(dev)
            prefills.append(PrefillPlan(seq_rows[i], n, total, start if one_run else None,
                                        None if kv_slots is None else kv_slots.to(dev), mask))
        group_rows: list[int] = []
        decode_seqs: list[int] = []
        for key in sorted(groups):
            group_rows.append(len(ids))
            decode_seqs.extend(groups[key])
            for i in groups[key]:
                seq = seqs[i]
                first = seq.num_cached_tokens
                start, first_run = seq.location.runs[0]
                seq_rows[i] = len(ids)
                ids.append(seq.token_ids[0])
                positions.append(first)
                slots.append(start + first if first < first_run else -1)  # -1: filled from the slot table
        split_row = len(ids)
        for i in split:
            seq = seqs[i]
            seq_rows[i] = len(ids)
            ids.append(seq.token_ids[0])
            positions.append(seq.num_cached_tokens)
            slots.append(seq.location.slot_of(seq.num_cached_tokens))
        decode_seqs.extend(split)
        write_slots = torch.tensor(slots, dtype=torch.int64)
        plans = [(row, len(groups[key]), *_plan_decode_group(row, [seqs[i] for i in groups[key]], write_slots))
                 for row, key in zip(group_rows, sorted(groups))]
        # Every gathered group's slots and length mask, end to end: one upload each; a group's
        # mask is a view of its rows (the same offsets as its slots in the gather buffer). The
        # split reads' gathered parts follow the groups' slots (they need no mask).
        group_slots = [p[4] for p in plans if p[4] is not None]
        split_reads, rest_slots = plan_split_reads(split_row, [seqs[i] for i in split], view_min_tokens,
                                                    sum(int(t.numel()) for t in group_slots), dev)
        gather_slots = _joined(group_slots + rest_slots, dev)
        masks = _joined([p[5] for p in plans if p[5] is not None], dev)
        decode_groups: list[DecodeGroup] = []
        gathered = 0  # rows of the gather buffer taken so far
        for row, b, span, view_start, gather, _ in plans:
            if gather is None:
                decode_groups.append(DecodeGroup(row, 1, span, None, view_start, None))
                continue
            assert masks is not None
            decode_groups.append(DecodeGroup(row, b, span, masks[gathered:gathered + b * span].view(b, 1, 1, span),
                                             None, gathered))
            gathered += b * span
        last_rows = [row + len(seq.token_ids) - 1 for row, seq in zip(seq_rows, seqs)]
        return cls(
            seqs=tuple(seqs),
            input_ids=torch.tensor(ids, dtype=torch.int64).to(dev),
            positions=torch.tensor(positions, dtype=torch.int64).to(dev),
            write_slots=write_slots.to(dev),
            last_token_rows=torch.tensor(last_rows, dtype=torch.int64).to(dev),
            prefills=tuple(prefills),
            decode_groups=tuple(decode_groups),
            seq_rows=tuple(seq_rows),
            prefill_seqs=tuple(prefill_seqs),
            decode_seqs=tuple(decode_seqs),
            max_position=max_total - 1,
            decode_gather_slots=gather_slots,
            split_reads=split_reads,
        )


def _joined(parts: list[torch.Tensor], dev: torch.device) -> torch.Tensor | None:
    """``parts`` end to end on ``dev`` (one upload); None when there are none."""
    if not parts:
        return None
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dev)


def location_slots(loc: KVLocation) -> torch.Tensor:
    """int64 [capacity]: the slot of every token of ``loc`` (CPU, memoized on the location)."""
    return loc.slot_table()


def _plan_decode_group(first_row: int, members: list[SequenceInput], write_slots: torch.Tensor
                       ) -> tuple[int, int | None, torch.Tensor | None, torch.Tensor | None]:
    """One decode group whose rows start at ``first_row``, with tensor ops over the group:
    (span L, the start of its one run where it is read as a view, else None; its B * L slots
    and their validity, CPU, flat, None for a view). Fills the write slots of members whose
    newest token is past their first run (in ``write_slots``, in place)."""
    lengths_l = [seq.num_cached_tokens + 1 for seq in members]
    span = max(lengths_l)
    b = len(members)
    if b == 1 and span <= members[0].location.runs[0][1]:
        return span, members[0].location.runs[0][0], None, None
    lengths = torch.tensor(lengths_l, dtype=torch.int64)
    starts = torch.tensor([seq.location.runs[0][0] for seq in members], dtype=torch.int64)
    j = torch.arange(span, dtype=torch.int64)
    valid = j[None, :] < lengths[:, None]
    # One-run members: start + j. Past its own length a row reads its first slot (masked).
    gather = torch.where(valid, starts[:, None] + j[None, :], starts[:, None])
    multi = [k for k, seq in enumerate(members) if lengths_l[k] > seq.location.runs[0][1]]
    if multi:  # members reading several runs: their slot tables, padded, in one go
        tables = torch.nn.utils.rnn.pad_sequence([members[k].location.slot_table() for k in multi],
                                                 batch_first=True)[:, :span]
        if tables.shape[1] < span:  # a longer one-run member set the span
            tables = F.pad(tables, (0, span - tables.shape[1]))
        m = torch.tensor(multi, dtype=torch.int64)
        gather[m] = torch.where(valid[m], tables, starts[m, None])
        write_slots[m + first_row] = gather[m, lengths[m] - 1]
    return span, None, gather.reshape(-1), valid.reshape(-1)


def arena_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """One full-attention layer over the arena, for every model family: write the new
    tokens' K/V ([T, kv, D]) at ``batch.write_slots``, gather the gathered decode groups' K/V
    (one gather each of K and V for all of them), then attend each prefill plan and each
    decode group; returns the attention output [T, H, D] in the batch's row order (the
    calls' outputs concatenated: the rows are laid out in call order)."""
    write_kv(k_cache, v_cache, batch.write_slots, k, v)
    slots = batch.decode_gather_slots
    k_gathered = None if slots is None else k_cache.index_select(0, slots)
    v_gathered = None if slots is None else v_cache.index_select(0, slots)
    parts = [prefill_attention(q[plan.token_offset:plan.token_offset + plan.num_new_tokens], k_cache, v_cache,
                               plan, scale) for plan in batch.prefills]
    parts.extend(decode_attention(q[group.rows], read_group_kv(k_cache, k_gathered, group),
                                  read_group_kv(v_cache, v_gathered, group), group, scale)
                 for group in batch.decode_groups)
    split = batch.split_reads
    if split is not None:
        parts.append(split_attention(q[split.rows], k_cache, v_cache, k_gathered, v_gathered, split, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Scatter new tokens' K/V ([T, kv, D]) into one layer's arena tensors at ``slots``."""
    k_cache.index_copy_(0, slots, k_new)
    v_cache.index_copy_(0, slots, v_new)


def read_group_kv(cache: torch.Tensor, gathered: torch.Tensor | None, group: DecodeGroup) -> torch.Tensor:
    """[B, L, kv, D] KV of a decode group: a view of one run in ``cache``, or its slice of the
    step's gather buffer ``gathered``."""
    if group.view_start is not None:
        return cache[group.view_start:group.view_start + group.span_tokens].unsqueeze(0)
    assert gathered is not None and group.gather_offset is not None, "a gathered group needs the step's gather"
    rows = group.num_seqs * group.span_tokens
    return gathered[group.gather_offset:group.gather_offset + rows].view(group.num_seqs, group.span_tokens,
                                                                         *cache.shape[1:])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: DecodeGroup,
                     scale: float) -> torch.Tensor:
    """Attention of B single-token queries ([B, H, D]) over their sequences' K and V
    ([B, L, kv, D] each: ``read_group_kv``) -> [B, H, D]."""
    b, heads, dim = q.shape
    kv_heads = k.shape[2]
    k = k.transpose(1, 2)  # [B, kv, L, D]
    v = v.transpose(1, 2)
    qg = q.reshape(b, kv_heads, heads // kv_heads, dim)  # the g heads of a KV head act as g queries
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.length_mask, scale=scale)
    return out.reshape(b, heads, dim)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      plan: PrefillPlan, scale: float) -> torch.Tensor:
    """Causal attention of one sequence's new queries ([n, H, D]) over its tokens [0, total)."""
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    g = heads // kv_heads
    if plan.kv_slots is None:
        assert plan.start_slot is not None
        k = k_cache[plan.start_slot:plan.start_slot + plan.num_total_tokens]
        v = v_cache[plan.start_slot:plan.start_slot + plan.num_total_tokens]
    else:
        k = k_cache.index_select(0, plan.kv_slots)
        v = v_cache.index_select(0, plan.kv_slots)
    total = plan.num_total_tokens
    # [kv, g, n, D] queries against [kv, 1->g, S, D] keys: an expand, not a copy of K/V.
    qg = q.view(n, kv_heads, g, dim).permute(1, 2, 0, 3)
    kg = k.transpose(0, 1)[:, None].expand(kv_heads, g, total, dim)
    vg = v.transpose(0, 1)[:, None].expand(kv_heads, g, total, dim)
    if plan.mask is None:
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=plan.mask, scale=scale)
    return out.permute(2, 0, 1, 3).reshape(n, heads, dim)
