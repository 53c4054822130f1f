"""The KV policy interface, and the shared base of the contiguous policies.

A policy decides *how much* KV each request gets and *where*; the extent allocator (or
the block pool) only hands out ranges. The scheduler talks to a policy through::

    can_reserve(req) -> bool           ask ...
    reserve(req) -> KVLocation | None  ... then commit (None: no room now, wait)
    ensure_capacity(id, tokens)        before a step writes KV: grow in place, migrate,
                                       or report NO_ROOM (preempt someone) / REQUEUE (this one)
    release(id, generated | None)      finished (length feeds online learning) or preempted

All policies share one arena; migrations copy KV through ``arena.move`` so the real engine
and the shape-only replay account moved bytes the same way.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from emulator.cost_model import KVLayout
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
    """Only the oracle reads this."""

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
    moved_tokens: int = 0
    how: str = ""  # "", "in_place", "moved", "safety_pool", "pages"


@dataclass(frozen=True)
class PolicyStats:
    policy: str
    capacity_tokens: int
    reserved_tokens: int
    live_requests: int
    overflowed_requests: int
    migrations: int
    migrated_tokens: int
    in_place_grows: int
    safety_pool_reservations: int
    fragmentation: FragmentationStats | None = None
    bucket_edges_tokens: tuple[int, ...] = ()
    extra: dict[str, float] = field(default_factory=dict)


class KVPolicy(ABC):
    """Base of every KV policy."""

    name: str = "abstract"
    layout: KVLayout = KVLayout("contiguous")
    uses_prediction: bool = False

    def __init__(self, arena: KVArena) -> None:
        self.arena = arena
        self.capacity_tokens = arena.capacity_tokens
        self._overflowed: set[str] = set()
        self.migrations = 0
        self.migrated_tokens = 0
        self.in_place_grows = 0
        self.safety_pool_reservations = 0

    # -- interface --------------------------------------------------------------------
    @abstractmethod
    def can_reserve(self, req: ReserveRequest) -> bool: ...

    @abstractmethod
    def reserve(self, req: ReserveRequest) -> KVLocation | None: ...

    @abstractmethod
    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult: ...

    @abstractmethod
    def release(self, request_id: str, generated_tokens: int | None) -> None:
        """Free a request's KV. ``generated_tokens`` is its final length when it finished,
        None when it was preempted (its KV is dropped and recomputed later)."""

    @abstractmethod
    def location(self, request_id: str) -> KVLocation: ...

    @abstractmethod
    def reserved_tokens(self) -> int: ...

    @abstractmethod
    def max_request_tokens(self) -> int:
        """The most KV tokens one request can ever hold under this policy."""

    @abstractmethod
    def check_integrity(self) -> None: ...

    @abstractmethod
    def num_live(self) -> int: ...

    def stats(self) -> PolicyStats:
        return PolicyStats(self.name, self.capacity_tokens, self.reserved_tokens(), self.num_live(),
                           len(self._overflowed), self.migrations, self.migrated_tokens, self.in_place_grows,
                           self.safety_pool_reservations)

    def mark_overflow(self, request_id: str) -> None:
        self._overflowed.add(request_id)

    @property
    def overflowed_requests(self) -> int:
        return len(self._overflowed)


@dataclass(slots=True)
class _Slab:
    allocator: ExtentAllocator
    extent: Extent
    prompt_tokens: int
    max_total_tokens: int
    first_tokens: int = 0
    """Size of the first reservation: outgrowing it is an overflow."""
    claim_tokens: int = 0
    """Size the policy intends this slab to have (may exceed the extent after a reclaim)."""
    live_tokens: int = 0
    """KV slots written (or about to be written this step)."""


class ContiguousPolicy(KVPolicy):
    """A policy whose requests each hold one slot range in one of its regions.

    Subclasses choose the first size (``initial_tokens``) and what happens on overflow
    (``grow``); this base owns the bookkeeping, in-place growth and one-copy migration.
    """

    def __init__(self, arena: KVArena, regions: list[ExtentAllocator] | None = None) -> None:
        super().__init__(arena)
        self.regions = regions or [ExtentAllocator(arena.capacity_tokens)]
        assert sum(r.capacity_tokens for r in self.regions) == arena.capacity_tokens, "regions must tile the arena"
        self._slabs: dict[str, _Slab] = {}
        self._owner: dict[int, str] = {}  # extent start slot -> request id (regions never overlap)

    @abstractmethod
    def initial_tokens(self, req: ReserveRequest) -> int:
        """Slab size for a new reservation (>= req.num_tokens)."""

    def region_for(self, req: ReserveRequest, size: int) -> ExtentAllocator | None:
        main = self.regions[0]
        return main if main.can_allocate(size) else None

    def can_reserve(self, req: ReserveRequest) -> bool:
        return self.region_for(req, self.initial_tokens(req)) is not None

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        assert req.request_id not in self._slabs, f"request {req.request_id} already holds KV"
        size = self.initial_tokens(req)
        assert size >= req.num_tokens, f"{self.name}: initial size {size} < {req.num_tokens} tokens to prefill"
        region = self.region_for(req, size)
        if region is None:
            return None
        extent = region.allocate(size)
        assert extent is not None, "region_for promised room"
        self.add_slab(req, region, extent, claim_tokens=max(size, extent.length))
        return KVLocation(capacity_tokens=extent.length, start_slot=extent.start)

    def add_slab(self, req: ReserveRequest, region: ExtentAllocator, extent: Extent, claim_tokens: int) -> None:
        if region is not self.regions[0]:
            self.safety_pool_reservations += 1
        self._slabs[req.request_id] = _Slab(region, extent, req.prompt_tokens, req.max_total_tokens,
                                            first_tokens=claim_tokens, claim_tokens=claim_tokens,
                                            live_tokens=req.num_tokens)
        self._owner[extent.start] = req.request_id

    def slab_at(self, start: int) -> _Slab | None:
        rid = self._owner.get(start)
        return None if rid is None else self._slabs[rid]

    def relocate(self, slab: _Slab, region: ExtentAllocator, new: Extent, live_tokens: int) -> None:
        """Move a slab's written KV to ``new`` (one contiguous copy) and free the old extent."""
        self.arena.move(range(slab.extent.start, slab.extent.start + live_tokens),
                        range(new.start, new.start + live_tokens))
        slab.allocator.free(slab.extent)
        self._owner[new.start] = self._owner.pop(slab.extent.start)
        slab.allocator, slab.extent = region, new
        self.migrations += 1
        self.migrated_tokens += live_tokens

    def location(self, request_id: str) -> KVLocation:
        slab = self._slabs[request_id]
        return KVLocation(capacity_tokens=slab.extent.length, start_slot=slab.extent.start)

    def capacity_of(self, request_id: str) -> int:
        return self._slabs[request_id].extent.length

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        slab = self._slabs[request_id]
        assert needed_tokens <= slab.max_total_tokens, \
            f"request {request_id} asks {needed_tokens} KV tokens, above its limit {slab.max_total_tokens}"
        if needed_tokens <= slab.extent.length:
            slab.live_tokens = needed_tokens
            return GrowResult(GrowStatus.OK)
        if needed_tokens > slab.first_tokens:
            self.mark_overflow(request_id)
        result = self.grow(request_id, slab, needed_tokens)
        if result.status == GrowStatus.OK:
            slab.live_tokens = needed_tokens
        return result

    def grow(self, request_id: str, slab: _Slab, needed_tokens: int) -> GrowResult:
        """Default overflow handling: none (static and oracle never overflow by design)."""
        return GrowResult(GrowStatus.NO_ROOM)

    def grow_in_place(self, slab: _Slab, *sizes: int) -> bool:
        """Extend ``slab`` into the free slots after it to the first of ``sizes`` that fits
        (bookkeeping only: no KV is copied)."""
        for size in sizes:
            grown = slab.allocator.grow_in_place(slab.extent, size)
            if grown is not None:
                slab.extent = grown
                self.in_place_grows += 1
                return True
        return False

    def try_grow_to(self, slab: _Slab, new_size: int, live_tokens: int,
                    regions: list[ExtentAllocator]) -> GrowResult | None:
        """Grow in place if the right neighbour is free, else move to the first region with a
        hole of ``new_size`` (one contiguous copy of the ``live_tokens`` already written)."""
        if self.grow_in_place(slab, new_size):
            return GrowResult(GrowStatus.OK, 0, "in_place")
        for region in regions:
            new = region.allocate(new_size)
            if new is None:
                continue
            self.relocate(slab, region, new, live_tokens)
            return GrowResult(GrowStatus.OK, live_tokens, "moved" if region is self.regions[0] else "safety_pool")
        return None

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        slab = self._slabs.pop(request_id)
        slab.allocator.free(slab.extent)
        del self._owner[slab.extent.start]

    def reserved_tokens(self) -> int:
        return sum(r.used_tokens for r in self.regions)

    def num_live(self) -> int:
        return len(self._slabs)

    def max_request_tokens(self) -> int:
        return max(r.capacity_tokens for r in self.regions)

    def check_integrity(self) -> None:
        for r in self.regions:
            r.check_integrity()
        held = sum(s.extent.length for s in self._slabs.values())
        assert held == self.reserved_tokens(), f"slabs hold {held} tokens, regions say {self.reserved_tokens()}"
        for rid, s in self._slabs.items():
            assert s.allocator in self.regions, f"{rid} points to a foreign region"
            assert self._owner.get(s.extent.start) == rid, f"owner index lost {rid}"
            assert s.live_tokens <= s.extent.length, f"{rid}: {s.live_tokens} live tokens in a {s.extent.length} slab"
        assert len(self._owner) == len(self._slabs), "owner index holds freed slabs"

    def stats(self) -> PolicyStats:
        base = super().stats()
        frag = self.regions[0].fragmentation()
        return PolicyStats(**{**base.__dict__, "fragmentation": frag})
