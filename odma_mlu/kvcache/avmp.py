"""A hybrid model's two pools behind one policy: attention KV + SSM state slots (AVMP).

The engine's scheduler talks to one policy. For a hybrid model (odma_mlu/models/bamba.py)
this wrapper adds the state pool (odma_mlu/kvcache/state_pool.py) to any KV policy:

    reserve(req)            KV from the inner policy, then a state slot; None = no room
    ensure_capacity(id, n)  the inner policy's growth
    release(id, ...)        the KV and the state slot (finish, preemption, abort alike)

One device budget: the state pool owns no memory of its own. Every ``chunk_slots`` state
slots are backed by a *loan* of KV capacity: a placeholder reservation of the bytes they
need, taken through the inner policy like a request (so every policy, contiguous or paged,
counts it against the same arena). Capacity moves between the pools only when an
allocation fails, deterministically:

    no free state slot, KV has room     -> take a loan (KV -> states), grow the pool
    KV cannot reserve or grow, and      -> shrink the pool by a chunk (its live states move
    the pool has a free chunk              below the new size: counted copies), repay the
                                           newest loan (states -> KV), retry

With ``migrate=False`` the pool keeps its initial ``state_slots`` (a static split).
"""

from __future__ import annotations

import math
from typing import Any

from odma_mlu.kvcache.policy import GrowResult, GrowStatus, PolicyStats, ReserveRequest
from odma_mlu.kvcache.state_pool import StatePool

LOAN_PREFIX = "__avmp_state_loan_"


class AvmpPolicy:
    """``inner`` (a KV policy over the attention layers' arena) plus ``states``."""

    swappable = False  # a request's SSM state is not in its runs: preemption recomputes

    def __init__(self, inner: Any, states: StatePool, kv_bytes_per_token: int, *, state_slots: int = 0,
                 migrate: bool = True, chunk_slots: int = 1) -> None:
        if chunk_slots < 1:
            raise ValueError(f"chunk_slots must be >= 1, got {chunk_slots}")
        assert states.num_slots == 0 and states.num_live == 0, "the state pool must start empty (loans back it)"
        self.inner = inner
        self.states = states
        self.migrate = migrate
        self.chunk_slots = chunk_slots
        self.loan_tokens = math.ceil(chunk_slots * states.slot_bytes / kv_bytes_per_token)
        self._loans: list[str] = []
        self._num_loans_made = 0
        self.migrations_to_states = 0
        self.migrations_to_kv = 0
        self.state_oom_events = 0
        for _ in range(math.ceil(state_slots / chunk_slots)):
            if not self._take_loan():
                raise ValueError(f"{state_slots} state slots ({state_slots * states.slot_bytes} bytes) do not fit the "
                                 f"KV capacity of {inner.capacity_tokens} tokens; lower state_slots or raise it")
        self.migrations_to_states = 0  # the initial split is not a migration

    def __getattr__(self, name: str) -> Any:  # name, layout, capacity_tokens, location, read_runs, ...
        return getattr(self.inner, name)

    # -- loans: capacity moves -------------------------------------------------------------
    def _take_loan(self) -> bool:
        loan_id = f"{LOAN_PREFIX}{self._num_loans_made}"
        # max_new_tokens 1 (not 0): policies size buckets by it; every policy then holds >= loan_tokens.
        # A loan is never read, so its runs may lie anywhere (read_per_block: no room held ahead,
        # any hole taken): held as one run it could need a hole the arena no longer has, with
        # nothing running to free one.
        req = ReserveRequest(request_id=loan_id, prompt_tokens=self.loan_tokens, max_new_tokens=1,
                             num_tokens=self.loan_tokens, prediction=None, true_output_tokens=1,
                             read_per_block=True)
        if self.inner.reserve(req) is None:
            return False
        self._num_loans_made += 1
        self._loans.append(loan_id)
        self.states.resize(self.states.num_slots + self.chunk_slots)
        self.migrations_to_states += 1
        return True

    def _repay_loan(self, keep_free_slots: int) -> bool:
        """Shrink the pool by one chunk (compacting live states) and give its KV back."""
        if not self._loans or self.states.num_free - self.chunk_slots < keep_free_slots:
            return False
        self.states.resize(self.states.num_slots - self.chunk_slots)
        self.inner.release(self._loans.pop(), None)
        self.migrations_to_kv += 1
        return True

    # -- the policy interface ----------------------------------------------------------------
    def can_reserve(self, req: ReserveRequest) -> bool:
        return (self.states.num_free > 0 or self.migrate) and self.inner.can_reserve(req)

    def reserve(self, req: ReserveRequest) -> Any:
        assert not req.request_id.startswith(LOAN_PREFIX), f"request id {req.request_id!r} is reserved for loans"
        loc = self.inner.reserve(req)
        # KV is short: give back state capacity, keeping a slot for this request. With no
        # request live, give it all back: a kept loan can split the arena so that no request
        # ever fits again while nothing runs to free memory (the loan is taken again below,
        # wherever the request leaves room).
        keep = 1 if self.num_live() > 0 else 0
        while loc is None and self.migrate and self._repay_loan(keep_free_slots=keep):
            loc = self.inner.reserve(req)
        if loc is None:
            return None
        if self.states.allocate(req.request_id) is None:
            if not (self.migrate and self._take_loan()) or self.states.allocate(req.request_id) is None:
                self.state_oom_events += 1
                self.inner.release(req.request_id, None)
                return None
            loc = self.inner.location(req.request_id)  # the loan may have moved KV (compaction)
        return loc

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        res = self.inner.ensure_capacity(request_id, needed_tokens)
        while res.status == GrowStatus.NO_ROOM and self.migrate and self._repay_loan(keep_free_slots=0):
            res = self.inner.ensure_capacity(request_id, needed_tokens)
        return res

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.inner.release(request_id, generated_tokens)
        self.states.free(request_id)

    # -- accounting (loans are not requests) ---------------------------------------------
    @property
    def num_loans(self) -> int:
        return len(self._loans)

    def num_live(self) -> int:
        return self.inner.num_live() - len(self._loans)

    def loaned_tokens(self) -> int:
        return sum(self.inner.location(loan).capacity_tokens for loan in self._loans)

    def reserved_tokens(self) -> int:
        """KV tokens held by requests (loans excluded: they back the state pool)."""
        return self.inner.reserved_tokens() - self.loaned_tokens()

    def max_request_tokens(self) -> int:
        """KV one request can surely be admitted with: the inner policy's, less what backs the
        state pool for good (every loan without migration; one slot's loan, its own, with it)
        and the inner policy's admission watermark (a static split's KV part can be smaller
        than a request that fits the whole arena: it would wait forever)."""
        backing = self.loaned_tokens() if not self.migrate else self.loan_tokens
        return max(0, self.inner.max_request_tokens() - backing - getattr(self.inner, "watermark_tokens", 0))

    def stats(self) -> PolicyStats:
        """The inner policy's, loans not counted as requests; ``extra`` adds the state pool."""
        base = self.inner.stats()
        extra = {**base.extra, "state_slots": float(self.states.num_slots), "state_live": float(self.states.num_live),
                 "migrations_to_states": float(self.migrations_to_states),
                 "migrations_to_kv": float(self.migrations_to_kv), "state_oom_events": float(self.state_oom_events),
                 "state_moved_bytes": float(self.states.moved_bytes)}
        return PolicyStats(**{**base.__dict__, "reserved_tokens": self.reserved_tokens(),
                              "live_requests": self.num_live(), "extra": extra})

    def check_integrity(self) -> None:
        self.inner.check_integrity()
        self.states.check_integrity()
        assert self.states.num_slots == len(self._loans) * self.chunk_slots, \
            f"{self.states.num_slots} state slots backed by {len(self._loans)} loans of {self.chunk_slots}"
        assert self.states.num_live == self.num_live(), \
            f"{self.states.num_live} state slots held by {self.num_live()} live requests"
