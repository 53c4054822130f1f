"""``paged``: vLLM-style fixed pages, and ``ideal``: the bound every policy is measured against.

::

    arena slots:  | page 0 | page 1 | page 2 | page 3 | ...     (page_tokens slots each)
    request A pages [3, 4, 0]  ->  runs ((3*P, 2P), (0, P))      adjacent pages merge

The free pages form a queue in vLLM v1's order (``FreeKVCacheBlockQueue``): a request takes
pages from the head; a finished or preempted request's pages go to the tail, last page
first. Under churn the pages of one request scatter across the arena, as in production.
Pages are taken one at a time as a request grows; when none is free the scheduler preempts
(swap to the host where the swap space holds the KV, else recompute: the scheduler's rule
for every policy). Admission keeps the common watermark free.

``ideal`` is paging with one-token pages (no fragmentation, no slack), every read priced
as one sequential run, free preemption (a preempted request resumes where it stopped, as
if its KV had been swapped out and back for nothing) and no watermark (with free
preemption running out of room costs nothing). It runs under the same scheduler and limits.
"""

from __future__ import annotations

from collections import deque

from odma_mlu.kvcache.arena import KVArena, KVLocation, covering_runs
from odma_mlu.kvcache.policy import GrowResult, GrowStatus, KVPolicy, ReserveRequest


class _PagedRequest:
    __slots__ = ("pages", "run_starts", "run_tokens", "limit_tokens")

    def __init__(self, limit_tokens: int) -> None:
        self.pages: list[int] = []
        # Runs, adjacent pages merged: first slot and tokens of each, as two lists (a read
        # takes the lengths whole).
        self.run_starts: list[int] = []
        self.run_tokens: list[int] = []
        self.limit_tokens = limit_tokens


class PagedPolicy(KVPolicy):
    name = "paged"
    can_run_out_of_room = True

    def __init__(self, arena: KVArena, page_tokens: int = 16, watermark_fraction: float = 0.0) -> None:
        super().__init__(arena, watermark_fraction)
        assert page_tokens > 0, "page size must be positive"
        self.page_tokens = page_tokens
        self.num_pages = arena.capacity_tokens // page_tokens
        self._free: deque[int] = deque(range(self.num_pages))
        self._reqs: dict[str, _PagedRequest] = {}

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)

    def can_reserve(self, req: ReserveRequest) -> bool:
        n = self._pages_for(req.num_tokens)
        return n <= len(self._free) and self.may_admit(n * self.page_tokens)

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        assert req.request_id not in self._reqs, f"request {req.request_id} already holds KV"
        if not self.can_reserve(req):
            return None
        r = _PagedRequest(req.max_total_tokens)
        self._reqs[req.request_id] = r
        self._take(r, self._pages_for(req.num_tokens))
        return self.location(req.request_id)

    def _take(self, r: _PagedRequest, num_pages: int) -> None:
        page_tokens = self.page_tokens
        for _ in range(num_pages):
            page = self._free.popleft()
            r.pages.append(page)
            start = page * page_tokens
            if r.run_starts and r.run_starts[-1] + r.run_tokens[-1] == start:  # extends the last run
                r.run_tokens[-1] += page_tokens
            else:
                r.run_starts.append(start)
                r.run_tokens.append(page_tokens)
                self.new_runs += 1

    def location(self, request_id: str) -> KVLocation:
        r = self._reqs[request_id]
        return KVLocation(tuple(zip(r.run_starts, r.run_tokens)))

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        return covering_runs(self._reqs[request_id].run_tokens, num_tokens)

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        r = self._reqs[request_id]
        assert needed_tokens <= r.limit_tokens, \
            f"request {request_id} asks {needed_tokens} KV tokens, above its limit {r.limit_tokens}"
        missing = self._pages_for(needed_tokens) - len(r.pages)
        if missing <= 0:
            return GrowResult(GrowStatus.OK)
        if missing > len(self._free):
            return GrowResult(GrowStatus.NO_ROOM)
        self._take(r, missing)
        return GrowResult(GrowStatus.OK, 0, "pages")

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        r = self._reqs.pop(request_id)
        self._free.extend(reversed(r.pages))

    def reserved_tokens(self) -> int:
        return (self.num_pages - len(self._free)) * self.page_tokens

    def free_tokens(self) -> int:
        return len(self._free) * self.page_tokens

    def num_live(self) -> int:
        return len(self._reqs)

    def max_request_tokens(self) -> int:
        return self.num_pages * self.page_tokens

    def check_integrity(self) -> None:
        used = [p for r in self._reqs.values() for p in r.pages]
        assert len(used) == len(set(used)), "a page is in two requests"
        assert not set(used) & set(self._free), "a page is both free and used"
        assert len(used) + len(self._free) == self.num_pages, "pages leaked"
        assert len(set(self._free)) == len(self._free), "a page is free twice"
        for rid, r in self._reqs.items():
            slots = [s + i for s, n in zip(r.run_starts, r.run_tokens) for i in range(n)]
            want = [p * self.page_tokens + i for p in r.pages for i in range(self.page_tokens)]
            assert slots == want, f"{rid}: runs do not describe its pages"


class IdealPolicy(PagedPolicy):
    name = "ideal"
    free_preemption = True
    stream_reads = True
    can_run_out_of_room = False  # no watermark: running out of room costs nothing here

    def __init__(self, arena: KVArena) -> None:
        super().__init__(arena, page_tokens=1)

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        """One run, whatever the pages (and ``stream_reads`` prices it at the stream rate)."""
        return (num_tokens,)
