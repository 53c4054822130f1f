"""The KV policy interface, and the shared base of the one-run (contiguous) policies.

Mechanism and policy are apart: an ``ExtentAllocator`` (token-granular runs) or a page
pool hands out, extends and takes back runs; a policy decides sizes, placement, admission
and when (if ever) to copy. The scheduler talks to a policy through::

    can_reserve(req) -> bool           ask ...
    reserve(req) -> KVLocation | None  ... then commit (None: no room now, wait)
    ensure_capacity(id, tokens)        before a step writes KV: extend in place, add a run,
                                       or report NO_ROOM (preempt someone) / REQUEUE (this one)
    release(id, generated | None)      finished (length feeds online learning) or preempted
    read_runs(id, tokens)              run lengths a decode read of ``tokens`` touches

Admission rule shared by every policy that can run out of room after admission (paged,
odma): a new request is admitted only if ``watermark_fraction`` of the KV capacity stays
free after it (``CacheConfig.watermark_fraction``, the same default for all).

All policies share one arena; KV copies go through ``arena.copy_run`` so the step-cost
function charges every copy the code issues.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from odma_mlu.kvcache.arena import KVArena, KVLocation
from odma_mlu.kvcache.extent import Extent, ExtentAllocator, FragmentationStats
from odma_mlu.predictor.base import LengthPrediction


@dataclass(frozen=True)
class ReserveRequest:
    """What a policy may know about a request when reserving its KV."""

    request_id: str
    prompt_tokens: int
    max_new_tokens: int
    num_tokens: int
    """Tokens whose KV the coming prefill writes: the prompt, plus generated tokens when a
    preempted request is recomputed."""
    prediction: LengthPrediction | None = None
    true_output_tokens: int | None = None
    """Only ``exact`` reads this."""
    read_per_block: bool = False
    """Its KV is read in blocks that lie apart whatever its runs are (a sliding-window ring,
    kvcache/window.py): one run reads no faster than several, so a copy into one run never
    pays (ODMA)."""
    pinned: bool = False
    """Its runs never move to make room for another request's growth (ODMA): a shared prefix
    block, whose runs its sharers keep (kvcache/prefix.py). A ring is pinned too."""

    @property
    def max_total_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


class GrowStatus(enum.Enum):
    OK = "ok"
    NO_ROOM = "no_room"  # nothing fits now: the scheduler preempts another request and retries
    REQUEUE = "requeue"  # the policy wants this request preempted and re-reserved (S3)


@dataclass(frozen=True)
class GrowResult:
    status: GrowStatus
    copied_tokens: int = 0
    how: str = ""  # "", "in_place", "new_run", "copied", "pages"


@dataclass(frozen=True)
class PolicyStats:
    policy: str
    capacity_tokens: int
    reserved_tokens: int
    live_requests: int
    overflowed_requests: int
    copies: int
    copied_tokens: int
    in_place_grows: int
    new_runs: int
    fragmentation: FragmentationStats | None = None
    bucket_edges_tokens: tuple[int, ...] = ()
    extra: dict[str, float] = field(default_factory=dict)


class KVPolicy(ABC):
    """Base of every KV policy."""

    name: str = "abstract"
    uses_prediction: bool = False
    free_preemption: bool = False
    """Only ``ideal``: a preempted request resumes where it stopped at no cost."""
    stream_reads: bool = False
    """Only ``ideal``: every KV read is priced at the stream (sequential) bandwidth."""
    swappable: bool = True
    """A preemption may swap the request's KV to the host and back (engine/scheduler.py):
    its runs, and a sliding-window model's ring with them (``swap_slots``). Wrappers that
    keep what cannot be swapped (SSM states, shared prefix pages) say False: their
    preemptions recompute."""
    learns_lengths: bool = False
    """Only ``odma``: a finished request's length (``release``) trains its length histogram."""
    can_run_out_of_room: bool = False
    """Requests may need memory after admission that is not reserved for them; these
    policies admit under the common free-memory watermark."""

    def __init__(self, arena: KVArena, watermark_fraction: float = 0.0) -> None:
        self.arena = arena
        self.capacity_tokens = arena.capacity_tokens
        self.watermark_tokens = int(watermark_fraction * arena.capacity_tokens) if self.can_run_out_of_room else 0
        self._overflowed: set[str] = set()
        self.copies = 0
        self.copied_tokens = 0
        self.in_place_grows = 0
        self.new_runs = 0

    # -- interface --------------------------------------------------------------------
    @abstractmethod
    def can_reserve(self, req: ReserveRequest) -> bool: ...

    @abstractmethod
    def reserve(self, req: ReserveRequest) -> KVLocation | None: ...

    @abstractmethod
    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult: ...

    def take_moved(self) -> tuple[str, ...]:
        """Requests whose runs another request's growth moved since the last call (ODMA moves
        a blocking run, ``OdmaPolicy._move_blocker``); the scheduler drops their cached
        locations. Other policies never move a request they were not asked about."""
        return ()

    @abstractmethod
    def release(self, request_id: str, generated_tokens: int | None) -> None:
        """Free a request's KV. ``generated_tokens`` is its final length when it finished,
        None when it was preempted (its KV is swapped to the host, or dropped and recomputed:
        either way the runs are free now)."""

    @abstractmethod
    def location(self, request_id: str) -> KVLocation: ...

    @abstractmethod
    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        """Lengths of the runs that tokens [0, num_tokens) of the request occupy."""

    def swap_slots(self, request_id: str, kv_tokens: int) -> tuple[int, ...]:
        """Arena slots a swap of the request's first ``kv_tokens`` moves over the host link,
        one entry per location it gathers (each a gather per layer), in the order of
        ``swap_locations``: here its runs alone."""
        return (kv_tokens,)

    def swap_locations(self, request_id: str) -> tuple[KVLocation, ...]:
        """Where a swap gathers from and writes back to, one per ``swap_slots`` entry."""
        return (self.location(request_id),)

    @abstractmethod
    def reserved_tokens(self) -> int: ...

    @abstractmethod
    def max_request_tokens(self) -> int:
        """The most KV tokens one request can ever hold under this policy."""

    @abstractmethod
    def check_integrity(self) -> None: ...

    @abstractmethod
    def num_live(self) -> int: ...

    # -- shared rules -------------------------------------------------------------------
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.reserved_tokens()

    def may_admit(self, hard_tokens: int) -> bool:
        """The common watermark: after taking ``hard_tokens`` this much must stay free. With
        no request live it keeps room for nobody's growth, and a request it held back (one
        that fits the card but not the card less the watermark) would wait forever: admit."""
        return self.num_live() == 0 or self.free_tokens() - hard_tokens >= self.watermark_tokens

    def stats(self) -> PolicyStats:
        return PolicyStats(self.name, self.capacity_tokens, self.reserved_tokens(), self.num_live(),
                           len(self._overflowed), self.copies, self.copied_tokens, self.in_place_grows,
                           self.new_runs)

    def mark_overflow(self, request_id: str) -> None:
        self._overflowed.add(request_id)

    @property
    def overflowed_requests(self) -> int:
        return len(self._overflowed)


@dataclass(slots=True)
class _Slab:
    extent: Extent
    max_total_tokens: int


class ContiguousPolicy(KVPolicy):
    """Policies whose requests each hold exactly one run, sized at admission and never
    grown (static, exact) or re-queued with a bigger size on overflow (S3).

    Subclasses choose the size (``initial_tokens``) and what happens on overflow (``grow``).
    """

    def __init__(self, arena: KVArena, watermark_fraction: float = 0.0) -> None:
        super().__init__(arena, watermark_fraction)
        self.allocator = ExtentAllocator(arena.capacity_tokens)
        self._slabs: dict[str, _Slab] = {}

    @abstractmethod
    def initial_tokens(self, req: ReserveRequest) -> int:
        """Run size for a new reservation (>= req.num_tokens)."""

    def can_reserve(self, req: ReserveRequest) -> bool:
        size = self.initial_tokens(req)
        return self.allocator.can_allocate(size) and self.may_admit(size)

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        assert req.request_id not in self._slabs, f"request {req.request_id} already holds KV"
        size = self.initial_tokens(req)
        assert size >= req.num_tokens, f"{self.name}: initial size {size} < {req.num_tokens} tokens to prefill"
        if not self.may_admit(size):
            return None
        extent = self.allocator.allocate(size)
        if extent is None:
            return None
        self._slabs[req.request_id] = _Slab(extent, req.max_total_tokens)
        return KVLocation(((extent.start, extent.length),))

    def location(self, request_id: str) -> KVLocation:
        e = self._slabs[request_id].extent
        return KVLocation(((e.start, e.length),))

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        assert num_tokens <= self._slabs[request_id].extent.length, f"{request_id}: read past its run"
        return (num_tokens,)

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        slab = self._slabs[request_id]
        assert needed_tokens <= slab.max_total_tokens, \
            f"request {request_id} asks {needed_tokens} KV tokens, above its limit {slab.max_total_tokens}"
        if needed_tokens <= slab.extent.length:
            return GrowResult(GrowStatus.OK)
        self.mark_overflow(request_id)
        return self.grow(request_id, needed_tokens)

    def grow(self, request_id: str, needed_tokens: int) -> GrowResult:
        """Overflow handling: none by default (static and exact never overflow by design)."""
        return GrowResult(GrowStatus.NO_ROOM)

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.allocator.free(self._slabs.pop(request_id).extent)

    def reserved_tokens(self) -> int:
        return self.allocator.used_tokens

    def num_live(self) -> int:
        return len(self._slabs)

    def max_request_tokens(self) -> int:
        return self.allocator.capacity_tokens

    def check_integrity(self) -> None:
        self.allocator.check_integrity()
        held = sum(s.extent.length for s in self._slabs.values())
        assert held == self.allocator.used_tokens, f"slabs hold {held} tokens, the allocator says {self.reserved_tokens()}"

    def stats(self) -> PolicyStats:
        base = super().stats()
        return PolicyStats(**{**base.__dict__, "fragmentation": self.allocator.fragmentation()})
