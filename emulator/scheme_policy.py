"""A shape-only memory scheme behind the KV policy interface the engine's ``Scheduler``
drives: what the baselines of emulator/hetero_policy.py (Jenga, vLLM's hybrid manager) and
emulator/hybrid_policy.py (vLLM's padded pool) share.

The schemes keep byte and page counts, not a slot space: token counts are the scheme's bytes
over ``bytes_per_token``, and a location lists the request's read runs in order from slot 0,
lengths, not addresses (the replay reads lengths only; no tensor runs through these
policies). They never move KV, so their arena reports no copies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from odma_mlu.kvcache.arena import IssuedCopies, KVLocation
from odma_mlu.kvcache.policy import GrowResult, GrowStatus, PolicyStats, ReserveRequest


class NoCopies:
    """What ``describe_step`` drains from a policy's arena: the copies issued and the bytes
    moved (``migrated_bytes``); none here."""

    moved_bytes = 0

    def take_issued_copies(self) -> IssuedCopies:
        return IssuedCopies()


class ShapeSchemePolicy(ABC):
    """Subclasses say how the scheme admits, grows, reads, releases and what it holds."""

    uses_prediction = False
    free_preemption = False
    stream_reads = False
    swappable = False  # hybrid schemes recompute, as the engine does for SSM models (hetero ones swap)
    can_run_out_of_room = True

    def __init__(self, name: str, budget_bytes: int, bytes_per_token: int) -> None:
        self.name = name
        self.bytes_per_token = bytes_per_token
        self.capacity_tokens = budget_bytes // bytes_per_token
        self.arena = NoCopies()
        self.overflowed_requests = 0

    def take_moved(self) -> tuple[str, ...]:
        """These schemes never move one request's KV for another's growth."""
        return ()

    @abstractmethod
    def held_tokens(self) -> dict[str, int]:
        """Tokens each live request holds (the scheme's own table)."""

    @abstractmethod
    def _admit(self, req: ReserveRequest) -> bool: ...

    @abstractmethod
    def _grow(self, request_id: str, needed_tokens: int) -> bool: ...

    @abstractmethod
    def _held_bytes(self) -> int: ...

    @abstractmethod
    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]: ...

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        assert req.request_id not in self.held_tokens(), f"request {req.request_id} already holds KV"
        if not self._admit(req):
            return None
        return self.location(req.request_id)

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        if needed_tokens <= self.held_tokens()[request_id]:
            return GrowResult(GrowStatus.OK)
        if not self._grow(request_id, needed_tokens):
            return GrowResult(GrowStatus.NO_ROOM)
        return GrowResult(GrowStatus.OK, 0, "pages")

    def location(self, request_id: str) -> KVLocation:
        runs, start = [], 0
        for n in self.read_runs(request_id, self.held_tokens()[request_id]):
            runs.append((start, n))
            start += n
        return KVLocation(tuple(runs))

    def reserved_tokens(self) -> int:
        return self._held_bytes() // self.bytes_per_token

    def num_live(self) -> int:
        return len(self.held_tokens())

    def stats_extra(self) -> dict[str, float]:
        return {}

    def stats(self) -> PolicyStats:
        return PolicyStats(self.name, self.capacity_tokens, self.reserved_tokens(), self.num_live(), 0, 0, 0, 0, 0,
                           extra=self.stats_extra())
