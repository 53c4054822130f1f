"""Three ways to hold a hybrid model's memory in one device budget (shape only).

A request of a hybrid model needs KV for its tokens in the attention layers and one fixed
state slot for all SSM layers. The schemes compared::

    static split   [ KV pages ............ | state slots ....... ]   boundary fixed at start
    AVMP           [ KV pages ......... <-|-> state slots ...... ]   boundary moves, only when
                   one pool cannot allocate and the other has room (deterministic; the
                   pool that shrinks first moves its live items below the new boundary,
                   and those copies are charged)
    padded (vLLM)  [ one pool of equal pages ]  a page holds ``block_tokens`` tokens of one
                   attention layer, and block_tokens is raised until a page also holds one
                   SSM layer's state; each SSM layer's state takes one (padded) page

Every scheme answers ``admit`` / ``grow`` with True or False (False = no room now: the
request waits, or a running one is preempted), and reports the bytes it holds against the
bytes that are live, so waste is measured the same way for all.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from odma_mlu.kvcache.state_pool import StatePool
from odma_mlu.models.hybrid_spec import HybridSpec

KV_PAGE_TOKENS = 16  # the dual pools page attention KV like vLLM's default block


@dataclass
class MemoryCounters:
    oom_events: int = 0
    """Allocations that failed (either pool), after any migration."""
    migrations: int = 0
    """Capacity moves between the pools (AVMP)."""
    copied_bytes: int = 0
    """Live KV pages or states moved out of capacity that changed pools."""
    num_copies: int = 0


class HybridMemory(ABC):
    name: str = "abstract"

    def __init__(self, hybrid: HybridSpec, budget_bytes: int) -> None:
        self.hybrid = hybrid
        self.budget_bytes = int(budget_bytes)
        self.counters = MemoryCounters()
        self._tokens: dict[str, int] = {}
        self.pending_copy_tokens: list[int] = []
        """KV copies (tokens, every attention layer) issued since the replay last drained them."""
        self.pending_state_copy_bytes: list[int] = []
        """State-slot copies (bytes) issued since the replay last drained them."""

    @property
    def kv_run_tokens(self) -> int:
        """Tokens of one attention layer's K (or V) that lie contiguously: the page."""
        return KV_PAGE_TOKENS

    def read_runs(self, request_id: str, tokens: int) -> tuple[int, ...]:
        """The runs a decode over ``tokens`` reads in each attention layer: pages."""
        full, rest = divmod(tokens, self.kv_run_tokens)
        return (self.kv_run_tokens,) * full + ((rest,) if rest else ())

    def take_copies(self) -> tuple[list[int], list[int]]:
        """(KV copy tokens, state copy bytes) issued since the last call."""
        out = (self.pending_copy_tokens, self.pending_state_copy_bytes)
        self.pending_copy_tokens, self.pending_state_copy_bytes = [], []
        return out

    @abstractmethod
    def admit(self, request_id: str, tokens: int) -> bool:
        """Reserve a state slot and KV for ``tokens``; False (nothing held) if there is no room."""

    @abstractmethod
    def grow(self, request_id: str, tokens: int) -> bool:
        """Make the request's KV hold ``tokens``; False if there is no room."""

    @abstractmethod
    def release(self, request_id: str) -> None: ...

    @abstractmethod
    def held_bytes(self) -> int:
        """Bytes of the budget allocated to live requests (pages and slots, padding included)."""

    @abstractmethod
    def check_integrity(self) -> None: ...

    def live_bytes(self) -> int:
        """Bytes that hold data: KV of every token plus one unpadded state per request."""
        h = self.hybrid
        return sum(t * h.kv_bytes_per_token + h.state_bytes_per_request for t in self._tokens.values())

    def max_requests_state_only(self) -> int:
        """Requests whose states alone would fill the budget (an upper bound on concurrency)."""
        return self.budget_bytes // self.hybrid.state_bytes_per_request


class PagePool:
    """KV pages with lowest-first allocation and compaction on shrink (shape only)."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages))
        self._owner: dict[int, str] = {}
        self.pages: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, request_id: str, count: int) -> bool:
        if count > len(self._free):
            return False
        got = [heapq.heappop(self._free) for _ in range(count)]
        for p in got:
            self._owner[p] = request_id
        self.pages.setdefault(request_id, []).extend(got)
        return True

    def free(self, request_id: str) -> None:
        for p in self.pages.pop(request_id, []):
            del self._owner[p]
            heapq.heappush(self._free, p)

    def resize(self, num_pages: int) -> int:
        """Grow or shrink; returns how many live pages moved below the new size."""
        assert num_pages >= len(self._owner), f"cannot shrink to {num_pages} pages: {len(self._owner)} are live"
        moved = 0
        if num_pages < self.num_pages:
            low_free = sorted(p for p in self._free if p < num_pages)
            for p in sorted(q for q in self._owner if q >= num_pages):
                dst = low_free.pop(0)
                rid = self._owner.pop(p)
                self._owner[dst] = rid
                self.pages[rid][self.pages[rid].index(p)] = dst
                moved += 1
            self._free = [p for p in range(num_pages) if p not in self._owner]
            heapq.heapify(self._free)
        else:
            for p in range(self.num_pages, num_pages):
                heapq.heappush(self._free, p)
        self.num_pages = num_pages
        return moved

    def check_integrity(self) -> None:
        assert len(self._free) + len(self._owner) == self.num_pages, "pages lost or duplicated"
        assert all(0 <= p < self.num_pages for p in self._owner), "an owned page lies outside the pool"
        assert sum(len(v) for v in self.pages.values()) == len(self._owner), "page lists disagree with owners"


class DualPools(HybridMemory):
    """A KV page pool and a state slot pool; ``migrate`` moves capacity on failure (AVMP)."""

    def __init__(self, hybrid: HybridSpec, budget_bytes: int, state_fraction: float, migrate: bool,
                 migrate_chunk_slots: int = 1) -> None:
        super().__init__(hybrid, budget_bytes)
        if not 0.0 <= state_fraction <= 1.0:
            raise ValueError(f"state_fraction {state_fraction} must lie in [0, 1]")
        self.name = "avmp" if migrate else f"static_split_{state_fraction:g}"
        self.migrate = migrate
        self.page_bytes = KV_PAGE_TOKENS * hybrid.kv_bytes_per_token
        self.chunk_slots = migrate_chunk_slots
        slots = int(state_fraction * budget_bytes) // hybrid.state_bytes_per_request
        self.states = StatePool(hybrid, slots, shape_only=True, dtype=_torch_dtype(hybrid))
        self.kv = PagePool((budget_bytes - slots * hybrid.state_bytes_per_request) // self.page_bytes)
        self.slack_bytes = budget_bytes - slots * hybrid.state_bytes_per_request - self.kv.num_pages * self.page_bytes

    def _pages(self, tokens: int) -> int:
        return math.ceil(tokens / KV_PAGE_TOKENS)

    # -- capacity moves (AVMP) ------------------------------------------------------------
    def _kv_to_states(self) -> bool:
        need = self.chunk_slots * self.hybrid.state_bytes_per_request - self.slack_bytes
        pages = max(0, math.ceil(need / self.page_bytes))
        if pages > self.kv.num_free:
            return False
        moved = self.kv.resize(self.kv.num_pages - pages)
        if moved:  # live KV pages move below the new boundary: one copy of their tokens
            self.pending_copy_tokens.append(moved * KV_PAGE_TOKENS)
            self.counters.copied_bytes += moved * self.page_bytes
            self.counters.num_copies += moved
        self.slack_bytes += pages * self.page_bytes - self.chunk_slots * self.hybrid.state_bytes_per_request
        self.states.resize(self.states.num_slots + self.chunk_slots)
        self.counters.migrations += 1
        return True

    def _states_to_kv(self, pages_needed: int) -> bool:
        slot = self.hybrid.state_bytes_per_request
        chunks = max(1, math.ceil((pages_needed * self.page_bytes - self.slack_bytes) / (self.chunk_slots * slot)))
        if chunks * self.chunk_slots > self.states.num_free:
            return False
        before = self.states.moved_bytes
        self.states.resize(self.states.num_slots - chunks * self.chunk_slots)
        if self.states.moved_bytes > before:
            self.pending_state_copy_bytes.append(self.states.moved_bytes - before)
            self.counters.copied_bytes += self.states.moved_bytes - before
            self.counters.num_copies += (self.states.moved_bytes - before) // slot
        self.slack_bytes += chunks * self.chunk_slots * slot
        pages = self.slack_bytes // self.page_bytes
        self.slack_bytes -= pages * self.page_bytes
        self.kv.resize(self.kv.num_pages + pages)
        self.counters.migrations += 1
        return True

    # -- interface ------------------------------------------------------------------------
    def _kv(self, request_id: str, pages: int) -> bool:
        if self.kv.allocate(request_id, pages):
            return True
        if self.migrate and self._states_to_kv(pages - self.kv.num_free) and self.kv.allocate(request_id, pages):
            return True
        self.counters.oom_events += 1
        return False

    def admit(self, request_id: str, tokens: int) -> bool:
        slot = self.states.allocate(request_id)
        if slot is None and self.migrate and self._kv_to_states():
            slot = self.states.allocate(request_id)
        if slot is None:
            self.counters.oom_events += 1
            return False
        if not self._kv(request_id, self._pages(tokens)):
            self.states.free(request_id)
            return False
        self._tokens[request_id] = tokens
        return True

    def grow(self, request_id: str, tokens: int) -> bool:
        extra = self._pages(tokens) - len(self.kv.pages.get(request_id, ()))
        if extra > 0 and not self._kv(request_id, extra):
            return False
        self._tokens[request_id] = tokens
        return True

    def release(self, request_id: str) -> None:
        self.kv.free(request_id)
        self.states.free(request_id)
        self._tokens.pop(request_id, None)

    def held_bytes(self) -> int:
        return (self.kv.num_pages - self.kv.num_free) * self.page_bytes + self.states.num_live * self.states.slot_bytes

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        self.states.check_integrity()
        total = self.kv.num_pages * self.page_bytes + self.states.nbytes + self.slack_bytes
        assert total == self.budget_bytes and self.slack_bytes >= 0, \
            f"pools hold {total} bytes (slack {self.slack_bytes}), budget is {self.budget_bytes}"


def _torch_dtype(hybrid: HybridSpec):  # noqa: ANN202 - torch dtype
    import torch

    return {1: torch.uint8, 2: torch.float16, 4: torch.float32}[hybrid.base.dtype_bytes]


def vllm_block_tokens(hybrid: HybridSpec, multiple_tokens: int = 16) -> int:
    """vLLM's hybrid rule: the smallest multiple of 16 tokens whose one-layer attention page
    holds one SSM layer's state."""
    per_token_layer = hybrid.base.kv_bytes_per_token_per_layer
    return math.ceil(hybrid.state_bytes_per_layer / per_token_layer / multiple_tokens) * multiple_tokens


class PaddedUnified(HybridMemory):
    """One pool of equal pages (vLLM's hybrid KV manager): a page is one layer's
    ``block_tokens`` tokens of KV, or one SSM layer's state padded to the page."""

    name = "padded_unified"

    def __init__(self, hybrid: HybridSpec, budget_bytes: int) -> None:
        super().__init__(hybrid, budget_bytes)
        self.block_tokens = vllm_block_tokens(hybrid)
        self.page_bytes = self.block_tokens * hybrid.base.kv_bytes_per_token_per_layer
        self.num_pages = budget_bytes // self.page_bytes
        self.used_pages = 0
        self._held: dict[str, int] = {}

    @property
    def kv_run_tokens(self) -> int:
        return self.block_tokens

    def _pages(self, tokens: int) -> int:
        h = self.hybrid
        return h.num_ssm_layers + h.num_attention_layers * math.ceil(tokens / self.block_tokens)

    def admit(self, request_id: str, tokens: int) -> bool:
        need = self._pages(tokens)
        if self.used_pages + need > self.num_pages:
            self.counters.oom_events += 1
            return False
        self.used_pages += need
        self._held[request_id] = need
        self._tokens[request_id] = tokens
        return True

    def grow(self, request_id: str, tokens: int) -> bool:
        extra = self._pages(tokens) - self._held[request_id]
        if extra > 0:
            if self.used_pages + extra > self.num_pages:
                self.counters.oom_events += 1
                return False
            self.used_pages += extra
            self._held[request_id] += extra
        self._tokens[request_id] = tokens
        return True

    def release(self, request_id: str) -> None:
        self.used_pages -= self._held.pop(request_id, 0)
        self._tokens.pop(request_id, None)

    def held_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    def padding_ratio(self) -> float:
        """Page bytes per SSM layer over the state's own bytes (how much a state is padded)."""
        return self.page_bytes / self.hybrid.state_bytes_per_layer

    def check_integrity(self) -> None:
        assert self.used_pages == sum(self._held.values()) <= self.num_pages, "page count drifted"
