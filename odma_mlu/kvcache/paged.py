"""``paged``: vLLM-style fixed pages with block tables (near-zero waste, scattered reads).

::

    arena slots:  | page 0 | page 1 | page 2 | page 3 | ...     (page_tokens slots each)
    request A block table: [3, 0]      -> tokens 0..15 in page 3, 16..31 in page 0

Pages are taken one at a time as a request grows; when none is free the scheduler
preempts (recompute), as vLLM does.
"""

from __future__ import annotations

from emulator.cost_model import KVLayout
from odma_mlu.kvcache.arena import KVArena, KVLocation
from odma_mlu.kvcache.policy import GrowResult, GrowStatus, KVPolicy, PolicyStats, ReserveRequest


class PagedPolicy(KVPolicy):
    name = "paged"

    def __init__(self, arena: KVArena, page_tokens: int = 16) -> None:
        super().__init__(arena)
        assert page_tokens > 0, "page size must be positive"
        self.page_tokens = page_tokens
        self.layout = KVLayout("paged", page_tokens)
        self.num_pages = arena.capacity_tokens // page_tokens
        # LIFO free list, lowest page first out: recently freed pages are reused first.
        self._free_pages: list[int] = list(range(self.num_pages - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._limits: dict[str, int] = {}

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)

    def can_reserve(self, req: ReserveRequest) -> bool:
        return self._pages_for(req.num_tokens) <= len(self._free_pages)

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        assert req.request_id not in self._tables, f"request {req.request_id} already holds KV"
        if not self.can_reserve(req):
            return None
        n = self._pages_for(req.num_tokens)
        self._tables[req.request_id] = [self._free_pages.pop() for _ in range(n)]
        self._limits[req.request_id] = req.max_total_tokens
        return self.location(req.request_id)

    def location(self, request_id: str) -> KVLocation:
        table = self._tables[request_id]
        return KVLocation(capacity_tokens=len(table) * self.page_tokens, block_table=tuple(table),
                          page_tokens=self.page_tokens)

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        table = self._tables[request_id]
        assert needed_tokens <= self._limits[request_id], \
            f"request {request_id} asks {needed_tokens} KV tokens, above its limit {self._limits[request_id]}"
        missing = self._pages_for(needed_tokens) - len(table)
        if missing <= 0:
            return GrowResult(GrowStatus.OK)
        if missing > len(self._free_pages):
            return GrowResult(GrowStatus.NO_ROOM)
        table.extend(self._free_pages.pop() for _ in range(missing))
        return GrowResult(GrowStatus.OK, 0, "pages")

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        table = self._tables.pop(request_id)
        self._limits.pop(request_id)
        self._free_pages.extend(reversed(table))

    def reserved_tokens(self) -> int:
        return (self.num_pages - len(self._free_pages)) * self.page_tokens

    def num_live(self) -> int:
        return len(self._tables)

    def max_request_tokens(self) -> int:
        return self.num_pages * self.page_tokens

    def check_integrity(self) -> None:
        used = [p for t in self._tables.values() for p in t]
        assert len(used) == len(set(used)), "a page is in two block tables"
        assert not set(used) & set(self._free_pages), "a page is both free and used"
        assert len(used) + len(self._free_pages) == self.num_pages, "pages leaked"
        assert len(set(self._free_pages)) == len(self._free_pages), "a page is free twice"

    def stats(self) -> PolicyStats:
        return super().stats()
