"""What one engine step issues, described once for the step-cost function.

The replay (shape-only), the emulated engine and the emulated server all describe a step
with ``describe_step`` and price it with the emulator's one step-cost function, so they
cannot disagree. Decode grouping is decided here, by ``decode_group_key``, and nowhere
else: ``ForwardBatch.build`` groups the real attention calls with the same key::

    decode sequence -> span class: its context rounded up to a quarter octave (a
                       multiple of 1/8 of the next power of two >= it, at least
                       MIN_SPAN_TOKENS); a group pads to its longest member, so padding
                       stays under 1/4 of the span (docs/engine.md, "Span classes")
    a sequence in one run of at least   -> a group of its own, read in place (a view):
      the view length (``ViewRule``)       past that length the gather it saves outweighs
                                           the attention call of its own group
                                           (``CostModel.view_rule``, from the device
                                           profile; None without one)
    a group of one sequence in one run  -> read in place (a view)
    a sequence in several runs whose    -> read in parts (``ViewRule.split_gain``,
      runs of at least the view length     ``splits_pay``): each such run in place, its
      save more calls than its parts       other runs as one gathered part; the parts'
      and the step's merge cost            partial attentions merged by their
                                           log-sum-exps, once a layer for every such
                                           sequence of the step
    any other group                     -> its members' slots, size x span, gathered
                                           with every other such group's in one gather
                                           per layer into a buffer that attention reads
                                           again (``decode_gathered_tokens``)

    prefill (cached + new tokens) in one run -> read in place
    prefill over several runs                -> its slots gathered per layer, then read
                                                (``prefill_read_runs``)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from odma_mlu.kvcache.arena import IssuedCopies

if TYPE_CHECKING:
    from odma_mlu.engine.scheduler import ScheduledBatch
    from odma_mlu.kvcache.policy import KVPolicy

MIN_SPAN_TOKENS = 64
SPAN_CLASSES_PER_OCTAVE = 4
"""Span classes between two powers of two. Each class is one more attention call per layer
(a launch) and saves padding (slots gathered, read and scored past a member's length):
chosen on development data (docs/engine.md, "Span classes")."""


SPLIT_MERGE_KERNELS = 5
"""Ops a layer spends merging the step's split reads' parts (``models/attention.py``
``split_attention``: two concatenations, a softmax over the parts, a product and a sum).
emulator/kernel_counts.py counts them from the forward; the split rule weighs them here."""


def split_parts(runs: "tuple[int, ...]", view_min_tokens: int) -> tuple[int, int, int]:
    """A decode over ``runs`` (token lengths) read in parts: (tokens read in place, in its runs
    of at least ``view_min_tokens``; its parts, those runs plus one for the others; the tokens
    of that gathered part)."""
    in_place = [n for n in runs if n >= view_min_tokens]
    in_place_tokens = sum(in_place)
    rest_tokens = sum(runs) - in_place_tokens
    return in_place_tokens, len(in_place) + (rest_tokens > 0), rest_tokens


@dataclass(frozen=True)
class ViewRule:
    """Where decode attention reads KV in place rather than gathering it, priced by the device
    profile (``CostModel.view_rule``): the one rule ``ForwardBatch.build`` (the engine) and
    ``StepWork.build`` (the pricing) both follow. Its unit is one attention call: what a
    decode group, a view or a split read's part costs a layer beyond its bytes and FLOPs."""

    min_tokens: int
    """The view length: gathering this many tokens (written to the buffer and read back)
    costs one attention call, so a decode in one run at least this long is read alone, in
    place (a group of its own)."""
    merge_calls: float = float(SPLIT_MERGE_KERNELS)
    """What the split reads' merge costs a layer (``SPLIT_MERGE_KERNELS`` launches), in
    attention calls; the default prices a call as one launch."""
    part_calls: float = 1.0
    """What one part of a split read costs a layer, in attention calls: 1 where the device
    has a kernel that returns the log-sum-exp, more where the engine runs it in plain ops
    (``models/split_reads.py``, ``PLAIN_LSE_KERNELS``)."""

    def __post_init__(self) -> None:
        assert self.min_tokens >= 1 and self.merge_calls >= 0 and self.part_calls >= 1, self

    def split_gain(self, runs: "tuple[int, ...]") -> float:
        """What reading a decode over ``runs`` (token lengths) in parts saves a layer, in
        attention calls, against gathering it whole: each run of at least ``min_tokens`` read
        in place saves its gather (``min_tokens`` tokens of gather are worth one call), and
        each part (``split_parts``) costs ``part_calls``. <= 0: read it whole, gathered."""
        if len(runs) < 2 or max(runs) < self.min_tokens:
            return 0.0
        in_place_tokens, parts, _ = split_parts(runs, self.min_tokens)
        return in_place_tokens / self.min_tokens - parts * self.part_calls

    def splits_pay(self, gains: "Iterable[float]") -> bool:
        """Whether the step reads its decodes of positive ``split_gain`` in parts: together they
        must save more than the merge costs (``merge_calls``, once a layer)."""
        return sum(g for g in gains if g > 0) > self.merge_calls


def _power_of_two_at_least(tokens: int) -> int:
    return 1 << max(0, tokens - 1).bit_length()


def decode_group_key(context_tokens: int) -> int:
    """The attention group (span class) of a decode sequence reading ``context_tokens``: the
    context rounded up to a multiple of ``1 / (2 SPAN_CLASSES_PER_OCTAVE)`` of the next power
    of two >= it (so 1,025..1,152 -> 1,152, ..., 1,921..2,048 -> 2,048), at least
    ``MIN_SPAN_TOKENS``. ``ForwardBatch.build`` inlines it (its hot path)."""
    step = max(1, _power_of_two_at_least(context_tokens) // (2 * SPAN_CLASSES_PER_OCTAVE))
    return max(MIN_SPAN_TOKENS, -(-context_tokens // step) * step)


def graph_span_tokens(context_tokens: int) -> int:
    """The span of a captured decode graph (``DecodeGraphRunner``) for a longest context of
    ``context_tokens``: the next power of two, at least ``MIN_SPAN_TOKENS`` (coarser than the
    span classes: each span is one more graph to capture and keep)."""
    return max(MIN_SPAN_TOKENS, _power_of_two_at_least(context_tokens))


@dataclass(frozen=True)
class StepWork:
    """One step as the code runs it: the step-cost function's only input."""

    prefill_new_tokens: tuple[int, ...] = ()
    """New tokens of each prefill (a whole prompt, or prompt + generated on a recompute)."""
    prefill_cached_tokens: tuple[int, ...] = ()
    """Tokens already in KV before each prefill chunk (0 without chunked prefill)."""
    prefill_read_runs: tuple[tuple[int, ...], ...] = ()
    """Per prefill, the token length of each KV run its attention reads (cached + new tokens).
    One run is read in place; several are first gathered into a buffer (``models/attention.py``
    ``prefill_attention``). Empty: every prefill reads one run."""
    decode_read_runs: tuple[tuple[int, ...], ...] = ()
    """Per decoding sequence, the token length of each KV run its attention reads
    (the new token included)."""
    decode_group_sizes: tuple[int, ...] = ()
    """Sequences in each decode attention group (one batched call per layer each)."""
    decode_group_views: int = 0
    """Groups of one sequence whose KV is one run: read as a view, no gather."""
    decode_gathered_tokens: int = 0
    """Slots the other groups gather per full layer (K and V each), all in one gather:
    members x each group's longest length, padding included (``models/attention.py``
    ``arena_attention``)."""
    decode_padding_tokens: int = 0
    """Of those, the slots past each member's own length (masked, but written and read)."""
    decode_split_parts: tuple[int, ...] = ()
    """Per decode read in parts (``ViewRule.split_gain``), its parts: its runs read in place,
    plus one for its other runs, gathered (their slots are in ``decode_gathered_tokens``)."""
    decode_split_rests: int = 0
    """Of the decodes read in parts, those with a gathered part."""
    copy_tokens: tuple[int, ...] = ()
    """Each contiguous KV copy issued this step (tokens, in every layer, K and V)."""
    copy_batch_sizes: tuple[int, ...] = ()
    """Copies in each batch the arena ran them in (``KVArena.take_issued_copies``)."""
    decode_sliding_runs: tuple[tuple[int, ...], ...] = ()
    """Per decoding sequence, the token length of each run its sliding-window layers read (at
    most the window; one sliding layer's runs of the request's ring in the arena). Empty: the cost
    model reads min(context, window) as one run (models without sliding layers ignore it)."""
    state_copy_bytes: tuple[int, ...] = ()
    """Each contiguous copy of SSM state slots issued this step (bytes; AVMP compaction)."""
    stream_reads: bool = False
    """Every KV read at the stream (sequential) bandwidth, whatever its runs: ``ideal``."""
    swap_tokens: tuple[int, ...] = ()
    """Each swap of a preempted request's KV to or from host memory (tokens, every layer)."""

    @classmethod
    def build(cls, prefill_new_tokens: "Iterable[int]" = (), decode_read_runs: "Iterable[tuple[int, ...]]" = (),
              copies: "IssuedCopies | Iterable[int]" = (), prefill_cached_tokens: "Iterable[int] | None" = None, *,
              prefill_read_runs: "Iterable[tuple[int, ...]]" = (), sliding_read_runs: "Iterable[tuple[int, ...]]" = (),
              state_copy_bytes: "Iterable[int]" = (), stream_reads: bool = False,
              swap_tokens: "Iterable[int]" = (), views: ViewRule | None = None) -> "StepWork":
        """A step from its prefills (new tokens, and tokens already cached before each:
        chunked prefill, prefix hits), each decode's read runs and its copies; the decode
        groups follow ``decode_group_key`` (the engine's grouping). ``prefill_read_runs``: each
        prefill's runs (cached + new tokens; none given: one run each). ``sliding_read_runs``: each
        decode's sliding-layer runs; ``state_copy_bytes``: the state copies issued;
        ``swap_tokens``: the host swaps. ``copies``: the arena's ``IssuedCopies``, or the tokens
        of each copy (then one batch). ``views``: a decode in one run at least its view length
        is a group of its own, read in place (None: only a lone one is), and a decode in
        several runs may be read in parts (``ViewRule.split_gain``; None: never)."""
        if isinstance(copies, IssuedCopies):
            copy_tokens, batch_sizes = copies.tokens, copies.batch_sizes
        else:
            copy_tokens = tuple(copies)
            batch_sizes = (len(copy_tokens),) if copy_tokens else ()
        prefill = tuple(prefill_new_tokens)
        cached = (0,) * len(prefill) if prefill_cached_tokens is None else tuple(prefill_cached_tokens)
        assert len(cached) == len(prefill), f"{len(prefill)} prefills but {len(cached)} cached counts"
        prefill_runs = tuple(tuple(r) for r in prefill_read_runs)
        assert not prefill_runs or [sum(r) for r in prefill_runs] == [c + n for c, n in zip(cached, prefill)], (
            f"prefill runs {prefill_runs} do not cover cached + new tokens {list(zip(cached, prefill))}")
        reads = tuple(tuple(r) for r in decode_read_runs)
        split: list[int] = []
        parts_each: list[int] = []
        gathered = rests = 0  # slots gathered (split reads' short runs, then the groups'); split reads gathering
        if views is not None and not stream_reads:
            gains = [views.split_gain(r) for r in reads]
            if views.splits_pay(gains):
                split = [i for i, g in enumerate(gains) if g > 0]
            for i in split:
                _, parts, rest = split_parts(reads[i], views.min_tokens)
                parts_each.append(parts)
                gathered += rest
                rests += rest > 0
        groups: dict[int, list[tuple[int, ...]]] = {}
        longest: dict[int, int] = {}
        total: dict[int, int] = {}
        skip = set(split)
        for i, r in enumerate(reads):
            if i in skip:
                continue
            n = sum(r)
            key = decode_group_key(n)
            if views is not None and n >= views.min_tokens and len(r) == 1:
                key = -1 - i  # a group of its own
            groups.setdefault(key, []).append(r)
            total[key] = total.get(key, 0) + n
            if n > longest.get(key, 0):
                longest[key] = n
        sizes = tuple(len(groups[k]) for k in sorted(groups))
        views = padding = 0
        for key, g in groups.items():
            if len(g) == 1 and len(g[0]) == 1:
                views += 1
            else:
                gathered += len(g) * longest[key]
                padding += len(g) * longest[key] - total[key]
        return cls(prefill_new_tokens=prefill, prefill_cached_tokens=cached, prefill_read_runs=prefill_runs,
                   decode_read_runs=reads,
                   decode_group_sizes=sizes, decode_group_views=views, decode_gathered_tokens=gathered,
                   decode_padding_tokens=padding, decode_split_parts=tuple(parts_each), decode_split_rests=rests,
                   copy_tokens=copy_tokens, copy_batch_sizes=batch_sizes,
                   decode_sliding_runs=tuple(tuple(r) for r in sliding_read_runs),
                   state_copy_bytes=tuple(state_copy_bytes), stream_reads=stream_reads,
                   swap_tokens=tuple(swap_tokens))

    @property
    def num_decodes(self) -> int:
        return len(self.decode_read_runs)

    @property
    def is_empty(self) -> bool:
        return not self.prefill_new_tokens and not self.decode_read_runs


def describe_step(batch: "ScheduledBatch", policy: "KVPolicy", views: ViewRule | None = None) -> StepWork:
    """The work of a scheduled batch under ``policy``; drains the arena's issued copies.

    A prefill is described by its chunk: the new tokens it computes this step and the tokens
    already in KV before them (earlier chunks, a shared prefix), which its attention reads
    with the new ones, from the runs the policy holds them in.
    Under a policy with free preemption (``ideal``), a recompute of a preempted request
    costs nothing beyond the decode step it would have taken: its last chunk is described
    as a decode over its context, its earlier chunks as nothing, and a swap as nothing.
    ``views``: the engine's (``StepWork.build``)."""
    prefill_new: list[int] = []
    prefill_cached: list[int] = []
    prefill_runs: list[tuple[int, ...]] = []
    reads: list[tuple[int, ...]] = []
    for i, s in enumerate(batch.prefill):
        new, cached = batch.prefill_chunk_tokens[i], batch.prefill_cached_tokens[i]
        if policy.free_preemption and s.num_generated > 0:
            if cached + new == s.num_tokens:
                reads.append((s.num_tokens,))
        else:
            prefill_new.append(new)
            prefill_cached.append(cached)
            prefill_runs.append(policy.read_runs(s.request_id, cached + new))
    for s in batch.decode:
        reads.append(policy.read_runs(s.request_id, s.num_tokens))
    return StepWork.build(prefill_new, reads, policy.arena.take_issued_copies(), prefill_cached,
                          prefill_read_runs=prefill_runs, sliding_read_runs=_sliding_reads(policy, batch, len(reads)),
                          state_copy_bytes=_take_state_copies(policy), stream_reads=policy.stream_reads,
                          swap_tokens=() if policy.free_preemption else batch.swap_tokens,
                          views=views)


def _sliding_reads(policy: Any, batch: "ScheduledBatch", num_decodes: int) -> list[tuple[int, ...]]:
    """Under a windowed policy (kvcache/window.py) each decode reads the entries its ring
    holds, ring indices [0, min(context, window)), as sliding layer 0's runs of the ring in the
    arena's flat lanes (one run per block in every layer): ``RingPool.read_runs``. Described in
    ``describe_step``'s order: the recomputes described as decodes (free preemption), then
    the decodes."""
    rings = getattr(policy, "rings", None)
    if rings is None:
        return []
    readers = [s for i, s in enumerate(batch.prefill) if policy.free_preemption and s.num_generated > 0
               and batch.prefill_cached_tokens[i] + batch.prefill_chunk_tokens[i] == s.num_tokens]
    readers += batch.decode
    assert len(readers) == num_decodes, f"{len(readers)} sliding reads for {num_decodes} decodes"
    return [rings.read_runs(s.request_id, s.num_tokens) for s in readers]


# StatePool counts the bytes it moved (``moved_bytes``); the part not yet described is this step's.
_STATE_BYTES_DESCRIBED: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def _take_state_copies(policy: Any) -> tuple[int, ...]:
    """State bytes a hybrid's pool (AvmpPolicy.states) moved since the last described step."""
    states = getattr(policy, "states", None)
    moved = getattr(states, "moved_bytes", None)
    if moved is None:
        return ()
    new = moved - _STATE_BYTES_DESCRIBED.get(states, 0)
    _STATE_BYTES_DESCRIBED[states] = moved
    return (new,) if new > 0 else ()
