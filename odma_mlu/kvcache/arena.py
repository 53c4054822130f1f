"""The physical KV store: per layer, one K and one V tensor indexed by token slot.

::

    k[layer]: [capacity_tokens, num_kv_heads, head_dim]     (v[layer] alike)
                 slot 0 ......................... capacity-1
    request A:   [=====A=====)                               one contiguous slot range
    request B:                 [=========B=========)         in every layer, K and V

Every policy describes a request's KV as an ordered list of runs (``KVLocation``): one
run for static/S3/exact, page-sized runs for paged, usually one for ODMA. Either way a
request's token ``t`` lives at one slot (``KVLocation.slot_of``), the same in every layer.
Per-layer tensors (not one big tensor) keep each under torch_mlu's 2^31-byte cap per K/V.
A model with sliding-window layers keeps their rings in these tensors too
(odma_mlu/kvcache/window.py): its arena is *flat*, its layers dealt into ``flat_groups``
equal groups with one K and one V tensor each (lane-major: ``k_groups[g][lane * capacity +
slot]`` for the group's ``lane``-th layer) and ``k[layer]`` a contiguous view of its group's
tensor, so one gather reaches any slot of any layer in a group; everything that uses
``k[layer]`` is unchanged. Several groups keep each tensor under the cap when one would pass it.

``shape_only=True`` keeps the accounting without tensors (7B-scale replay on a laptop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from odma_mlu.config import ModelSpec


Run = tuple[int, int]
"""A physical run of KV: (first slot, tokens). Consecutive token slots in every layer."""


def covering_runs(run_lengths: Sequence[int], num_tokens: int) -> tuple[int, ...]:
    """The lengths of the leading runs (of ``run_lengths``, in order) that tokens
    [0, num_tokens) occupy: what a read of ``num_tokens`` touches. Trimmed from the end: a
    read is nearly always all of a request's runs but the unfilled tail of the last (a paged
    long request has hundreds), so this costs a sum at C speed and a few steps back."""
    excess = sum(run_lengths) - num_tokens
    assert excess >= 0, f"a read of {num_tokens} tokens goes past the runs"
    if excess == 0:
        return tuple(run_lengths)
    out = list(run_lengths)
    while out and excess >= out[-1]:  # runs wholly past the read
        excess -= out.pop()
    if out:
        out[-1] -= excess
    return tuple(out)


@dataclass(frozen=True)
class KVLocation:
    """Where a request's KV lives: an ordered list of runs. Token ``t`` of the request is
    the ``t``-th slot when the runs are read one after another::

        runs ((100, 4), (40, 3))  ->  tokens 0..3 at slots 100..103, tokens 4..6 at 40..42

    Static, S3 and exact hold one run; paged holds page-sized runs (adjacent pages merge);
    ODMA holds one run per placement (usually one)."""

    runs: tuple[Run, ...]

    def __post_init__(self) -> None:
        assert self.runs and min(n for _, n in self.runs) > 0, f"a KV location needs non-empty runs: {self.runs}"

    @classmethod
    def from_pages(cls, pages: "tuple[int, ...] | list[int]", page_tokens: int) -> "KVLocation":
        """The runs of a block table: pages of ``page_tokens`` slots, adjacent ones merged."""
        runs: list[list[int]] = []
        for p in pages:
            start = p * page_tokens
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1][1] += page_tokens
            else:
                runs.append([start, page_tokens])
        return cls(tuple((a, b) for a, b in runs))

    @property
    def capacity_tokens(self) -> int:
        return sum(n for _, n in self.runs)

    @property
    def num_runs(self) -> int:
        return len(self.runs)

    @property
    def start_slot(self) -> int:
        return self.runs[0][0]

    def first_run_covers(self, num_tokens: int) -> bool:
        """Tokens [0, num_tokens) all lie in the first run (a one-run read: a view)."""
        return num_tokens <= self.runs[0][1]

    def run_tokens(self, num_tokens: int) -> tuple[int, ...]:
        """Lengths of the runs that tokens [0, num_tokens) occupy, in order."""
        return covering_runs([n for _, n in self.runs], num_tokens)

    def slot_of(self, token_index: int) -> int:
        assert 0 <= token_index < self.capacity_tokens, \
            f"token {token_index} outside the reservation of {self.capacity_tokens} tokens"
        for start, n in self.runs:
            if token_index < n:
                return start + token_index
            token_index -= n
        raise AssertionError("unreachable")

    def longest_run_tokens(self) -> int:
        """The longest run's tokens (memoized on the location object, as ``slot_table``)."""
        longest = self.__dict__.get("_longest_run")
        if longest is None:
            longest = max(n for _, n in self.runs)
            object.__setattr__(self, "_longest_run", longest)
        return longest

    def slot_table(self) -> torch.Tensor:
        """int64 [capacity_tokens] (CPU): the slot of every token, built once per location
        object and kept on it (the scheduler reuses a sequence's location until its runs
        change), so per-step readers index it instead of walking the runs."""
        table = self.__dict__.get("_slot_table")
        if table is None:
            starts = torch.tensor([s for s, _ in self.runs], dtype=torch.int64)
            lengths = torch.tensor([n for _, n in self.runs], dtype=torch.int64)
            offsets = torch.cumsum(lengths, 0) - lengths  # token index of each run's first token
            table = torch.repeat_interleave(starts - offsets, lengths) + torch.arange(int(lengths.sum()))
            object.__setattr__(self, "_slot_table", table)  # a memo, not a field: equality is by runs
        return table

    def slots(self, first: int, count: int) -> torch.Tensor:
        """Slot indices of tokens [first, first + count) as an int64 tensor (CPU)."""
        assert first >= 0 and first + count <= self.capacity_tokens, "slots past the reservation"
        if count <= 0:
            return torch.empty(0, dtype=torch.int64)
        parts: list[torch.Tensor] = []
        pos = 0  # token index of the current run's first token
        for start, n in self.runs:
            lo, hi = max(first, pos), min(first + count, pos + n)
            if lo < hi:
                parts.append(torch.arange(start + lo - pos, start + hi - pos, dtype=torch.int64))
            pos += n
            if pos >= first + count:
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass(frozen=True)
class HostKV:
    """A preempted request's KV in host memory: per layer, K and V of its first tokens."""

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.k[0].shape[0])


@dataclass(frozen=True)
class IssuedCopies:
    """The KV copies carried out since the last ``KVArena.take_issued_copies``: tokens of each
    copy (every layer, K and V) and how many copies each batch ran (a batch is one set of
    kernels per layer: a contiguous copy of K and of V for one copy, else a gather and a
    scatter of each)."""

    tokens: tuple[int, ...] = ()
    batch_sizes: tuple[int, ...] = ()


class KVArena:
    """Token-slot KV tensors for every layer, or only their accounting (``shape_only``)."""

    def __init__(self, model: ModelSpec, capacity_tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float16, shape_only: bool = False, flat_groups: int = 0) -> None:
        """``flat_groups``: 0 for one tensor per layer; g >= 1 for g flat K and V tensors
        (``k_groups``, ``v_groups``) of ``num_layers / g * capacity_tokens`` slots each, the
        per-layer tensors views of them (layer ``l`` in group ``l // (num_layers / g)``)."""
        assert capacity_tokens > 0, "arena capacity must be positive"
        self.model = model
        self.capacity_tokens = int(capacity_tokens)
        self.shape_only = shape_only
        assert flat_groups == 0 or model.num_layers % flat_groups == 0, \
            f"{model.num_layers} layers do not split into {flat_groups} equal flat groups"
        self.flat_groups = flat_groups
        self.dtype = dtype
        self.device = torch.device(device)
        self._pinned_host = self.device.type != "cpu"
        """Swap to page-locked host memory (accelerators, until it fails once; ``_to_host``)."""
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.k_groups: tuple[torch.Tensor, ...] = ()
        """Flat arenas: per group [layers per group * capacity_tokens, kv_heads, head_dim], lane-major."""
        self.v_groups: tuple[torch.Tensor, ...] = ()
        if not shape_only:
            cap = self.capacity_tokens
            shape = (cap, model.num_kv_heads, model.head_dim)
            if flat_groups:
                lanes = model.num_layers // flat_groups
                whole = (lanes * cap, model.num_kv_heads, model.head_dim)
                self.k_groups = tuple(torch.zeros(whole, dtype=dtype, device=self.device) for _ in range(flat_groups))
                self.v_groups = tuple(torch.zeros(whole, dtype=dtype, device=self.device) for _ in range(flat_groups))
                self.k = [self.k_groups[i // lanes][(i % lanes) * cap:(i % lanes + 1) * cap]
                          for i in range(model.num_layers)]
                self.v = [self.v_groups[i // lanes][(i % lanes) * cap:(i % lanes + 1) * cap]
                          for i in range(model.num_layers)]
            else:
                for _ in range(model.num_layers):
                    self.k.append(torch.zeros(shape, dtype=dtype, device=self.device))
                    self.v.append(torch.zeros(shape, dtype=dtype, device=self.device))
        self.moved_bytes = 0
        self._copied_tokens: list[int] = []
        """Token counts of the copies carried out or pending since ``take_issued_copies``."""
        self._batch_sizes: list[int] = []
        """Copies in each batch carried out since ``take_issued_copies``."""
        self._pending: list[tuple[int, int, int]] = []
        """(source slot, target slot, tokens) of the copies of the batch not yet carried out."""

    @property
    def flat(self) -> bool:
        return self.flat_groups > 0

    @property
    def bytes_per_token(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.model.num_layers * self.model.num_kv_heads * self.model.head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.capacity_tokens * self.bytes_per_token

    def copy_run(self, src_start: int, dst_start: int, num_tokens: int) -> int:
        """Copy ``num_tokens`` slots of KV from ``src_start`` to ``dst_start`` in every layer
        (overlapping ranges allowed); returns bytes.

        The copies a step issues run together, as one batch, when they are taken
        (``take_issued_copies``: each step before its forward; ``swap_out`` and ``swap_in``
        before they touch the KV)::

            copy_run(a -> b); copy_run(c -> d) ...      queued: nothing moves yet
            take_issued_copies()                        one copy: a contiguous copy per K and V
                                                        tensor; more: per tensor one gather of
                                                        every source, then one scatter

        All sources are read before any target is written, which equals copying in order
        unless a copy reads or writes what an earlier one of the batch writes: such a copy
        first runs the batch before it (a batch of its own, charged as one). Every batch is
        recorded so the step-cost function charges its kernels and bytes
        (``odma_mlu.engine.step_work.describe_step`` drains it)."""
        assert num_tokens > 0, f"copy of {num_tokens} tokens"
        assert 0 <= src_start and src_start + num_tokens <= self.capacity_tokens, "copy source outside the arena"
        assert 0 <= dst_start and dst_start + num_tokens <= self.capacity_tokens, "copy target outside the arena"
        nbytes = num_tokens * self.bytes_per_token
        self.moved_bytes += nbytes
        self._copied_tokens.append(num_tokens)
        src_end, dst_end = src_start + num_tokens, dst_start + num_tokens
        if any(d < src_end and src_start < d + n or d < dst_end and dst_start < d + n for _, d, n in self._pending):
            self._run_batch()
        self._pending.append((src_start, dst_start, num_tokens))
        return nbytes

    def copy_runs_at_once(self, moves: "list[tuple[int, int, int]]") -> int:
        """Carry out ``moves`` ((source slot, target slot, tokens) each) as one batch in which
        every source is read before any target is written, as if all moved at once: a
        target may overlap another move's source (a permutation of slots, such as a
        compaction that swaps a window's occupants with the request moving into it), but no
        two targets may overlap. Copies issued before run first; returns bytes."""
        spans = sorted((dst, dst + n) for _, dst, n in moves)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two moves write the same slots"
        self._run_batch()
        nbytes = 0
        for src, dst, n in moves:
            assert n > 0 and 0 <= src and src + n <= self.capacity_tokens and 0 <= dst and \
                dst + n <= self.capacity_tokens, f"move {src} -> {dst} of {n} tokens outside the arena"
            nbytes += n * self.bytes_per_token
            self._copied_tokens.append(n)
        self.moved_bytes += nbytes
        self._pending = list(moves)
        self._run_batch()
        return nbytes

    @property
    def num_pending_copies(self) -> int:
        """Copies issued and not yet carried out: the batch a new copy would join."""
        return len(self._pending)

    def _run_batch(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._batch_sizes.append(len(batch))
        if self.shape_only:
            return
        if len(batch) == 1:
            (src, dst, n), = batch
            s, d = slice(src, src + n), slice(dst, dst + n)
            overlap = src < dst + n and dst < src + n
            for t in (*self.k, *self.v):
                t[d] = t[s].clone() if overlap else t[s]
            return
        src_idx = torch.cat([torch.arange(a, a + n) for a, _, n in batch]).to(self.device)
        dst_idx = torch.cat([torch.arange(b, b + n) for _, b, n in batch]).to(self.device)
        for t in (*self.k, *self.v):
            t.index_copy_(0, dst_idx, t.index_select(0, src_idx))

    def take_issued_copies(self) -> "IssuedCopies":
        """Carry out the pending copies, then report (and forget) every copy issued since the
        last call."""
        self._run_batch()
        out = IssuedCopies(tuple(self._copied_tokens), tuple(self._batch_sizes))
        self._copied_tokens.clear()
        self._batch_sizes.clear()
        return out

    def swap_out(self, location: KVLocation, num_tokens: int) -> "HostKV":
        """Copy tokens [0, num_tokens) of ``location`` to host memory, K and V of every layer
        (per tensor: one gather of its slots, one device-to-host copy; in a flat arena, of
        every lane through its per-layer view, which is how a ring's rows go too).

        On an accelerator the host copies are page-locked and asynchronous (as vLLM's swap
        blocks): the link then runs at the DMA rate the profile's ``host_link`` prices, and
        the copies stay ordered on the device's stream, before any kernel that reuses the
        freed slots and before the copy back (``swap_in``). Where page-locked memory cannot
        be had, the copies are plain ones."""
        assert not self.shape_only, "a shape-only arena has no KV to swap"
        assert 0 < num_tokens <= location.capacity_tokens, f"swap of {num_tokens} tokens"
        self._run_batch()  # a pending copy may have moved these tokens
        idx = location.slots(0, num_tokens).to(self.device)
        to_host = self._to_host if self.device.type != "cpu" else (lambda t: t)  # on a CPU the gather is the copy
        return HostKV(tuple(to_host(t.index_select(0, idx)) for t in self.k),
                      tuple(to_host(t.index_select(0, idx)) for t in self.v))

    def _to_host(self, src: torch.Tensor) -> torch.Tensor:
        if self._pinned_host:
            try:
                dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            except RuntimeError:  # no page-locked allocator for this device: plain copies
                self._pinned_host = False
            else:
                return dst.copy_(src, non_blocking=True)
        return src.to("cpu")

    def swap_in(self, location: KVLocation, kv: "HostKV") -> None:
        """Write ``kv`` (from ``swap_out``) to tokens [0, kv.num_tokens) of ``location``."""
        assert not self.shape_only, "a shape-only arena has no KV to swap"
        self._run_batch()  # a pending copy may read the slots written here
        idx = location.slots(0, kv.num_tokens).to(self.device)
        for dst, src in zip((*self.k, *self.v), (*kv.k, *kv.v)):
            dst.index_copy_(0, idx, src.to(self.device, non_blocking=src.is_pinned()))

