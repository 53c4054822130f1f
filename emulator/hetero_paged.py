"""Paged baselines for models with full and sliding-window layers, shape only, behind the
``HeteroMemory`` interface (emulator/hetero_memory.py); ``odma-mlu bench`` runs them as KV
policies (emulator/hetero_policy.py). ``F`` full layers, ``S`` sliding layers of window
``W``, ``b`` bytes of K+V per token per layer::

    jenga         ``JengaLCM``, Jenga's two-level allocator (SOSP 2025): large pages of
                  LCM(16 F b, 16 S b) bytes, carved into per-group small pages of 16 tokens;
                  a request's small pages go to a large page it already uses when possible
                  (request-aware); a large page returns to the pool when all its small pages
                  are free; pages that left the window are freed (per-group eviction).
    vllm_hybrid   ``VllmHybrid``, vLLM's hybrid manager: one block size; layers split into
                  groups of g = min(F, S) layers (the last group of a type padded to g); every
                  group takes blocks of 16 tokens x g layers from one pool; sliding groups
                  free blocks that left the window.
    vllm_uniform  ``VllmHybrid(uniform=True)``, vLLM before the hybrid manager (Jenga's
                  baseline): every layer keeps every token in 16-token blocks.
"""

from __future__ import annotations

import math

from emulator.hetero_memory import PAGE_TOKENS, HeteroMemory, HeteroShape, _paged_runs
from odma_mlu.predictor.base import LengthPrediction


def live_pages(tokens: int, window: int | None) -> range:
    """Page indices a request of ``tokens`` keeps: all, or those not entirely out of the window."""
    end = math.ceil(tokens / PAGE_TOKENS)
    if window is None or tokens <= window:
        return range(0, end)
    return range((tokens - window) // PAGE_TOKENS, end)


class JengaLCM(HeteroMemory):
    """Large pages of LCM(small page bytes) carved into per-group small pages."""

    def __init__(self, shape: HeteroShape, budget_bytes: int, watermark_fraction: float) -> None:
        super().__init__(shape, budget_bytes, watermark_fraction, "jenga")
        b = shape.layer_token_bytes
        self.windows = (None, shape.window_tokens)  # group 0: full, group 1: sliding
        self.small_bytes = (PAGE_TOKENS * shape.num_full * b, PAGE_TOKENS * shape.num_sliding * b)
        self.large_bytes = math.lcm(*self.small_bytes)
        self.per_large = tuple(self.large_bytes // s for s in self.small_bytes)
        self.num_large = budget_bytes // self.large_bytes
        self.free_large: list[int] = list(range(self.num_large - 1, -1, -1))
        self.group_of: dict[int, int] = {}  # large page -> group it is carved for
        self.free_small: dict[int, list[int]] = {}  # large page -> its free small slots
        self.partial: tuple[set[int], set[int]] = (set(), set())  # per group: large pages with a free slot
        self.pages: dict[str, tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]] = {}
        self.larges_of: dict[str, dict[int, int]] = {}  # request -> large page -> its small pages there

    def _take_small(self, rid: str, g: int) -> tuple[int, int] | None:
        mine = [lp for lp in self.larges_of[rid] if self.group_of[lp] == g and self.free_small[lp]]
        if mine:  # request-aware: fill a large page this request already uses
            lp = mine[0]
        elif self.partial[g]:
            lp = min(self.partial[g])
        elif self.free_large:
            lp = self.free_large.pop()
            self.group_of[lp] = g
            self.free_small[lp] = list(range(self.per_large[g] - 1, -1, -1))
            self.partial[g].add(lp)
        else:
            return None
        slot = self.free_small[lp].pop()
        if not self.free_small[lp]:
            self.partial[g].discard(lp)
        self.larges_of[rid][lp] = self.larges_of[rid].get(lp, 0) + 1
        return lp, slot

    def _give_small(self, rid: str, g: int, lp: int, slot: int) -> None:
        self.free_small[lp].append(slot)
        self.partial[g].add(lp)
        self.larges_of[rid][lp] -= 1
        if not self.larges_of[rid][lp]:
            del self.larges_of[rid][lp]
        if len(self.free_small[lp]) == self.per_large[g]:  # every small page free: back to the pool
            self.partial[g].discard(lp)
            del self.free_small[lp], self.group_of[lp]
            self.free_large.append(lp)

    def _ensure(self, rid: str, tokens: int) -> bool:
        for g, window in enumerate(self.windows):
            pages = self.pages[rid][g]
            keep = live_pages(tokens, window)
            for k in [k for k in pages if k < keep.start]:  # left the window: per-group eviction
                self._give_small(rid, g, *pages.pop(k))
            for k in keep:
                if k not in pages:
                    got = self._take_small(rid, g)
                    if got is None:
                        return False
                    pages[k] = got
        self.tokens[rid] = tokens
        return True

    def admit(self, rid: str, num_tokens: int, prompt_tokens: int, max_new_tokens: int,
              prediction: LengthPrediction | None) -> bool:
        self.pages[rid] = ({}, {})
        self.larges_of[rid] = {}
        self.tokens[rid] = num_tokens
        if not self._ensure(rid, num_tokens) or len(self.free_large) * self.large_bytes \
                < self.watermark_fraction * self.budget_bytes:
            self.release(rid, None)
            return False
        return True

    def grow(self, rid: str, num_tokens: int) -> bool:
        return self._ensure(rid, num_tokens)

    def release(self, rid: str, generated_tokens: int | None) -> None:
        for g in (0, 1):
            for lp, slot in self.pages[rid][g].values():
                self._give_small(rid, g, lp, slot)
        del self.pages[rid], self.larges_of[rid]
        self.tokens.pop(rid)

    def held_bytes(self) -> int:
        return (self.num_large - len(self.free_large)) * self.large_bytes

    def read_runs(self, rid: str, num_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return _paged_runs(num_tokens), _paged_runs(min(num_tokens, self.shape.window_tokens))

    def check_integrity(self) -> None:
        used = [p for pages in self.pages.values() for g in (0, 1) for p in pages[g].values()]
        assert len(used) == len(set(used)), "a small page is held twice"
        for lp, free in self.free_small.items():
            taken = {s for (l2, s) in used if l2 == lp}
            assert not taken & set(free), f"large page {lp}: a small page both free and held"
            assert len(taken) + len(free) == self.per_large[self.group_of[lp]], f"large page {lp} leaks small pages"
        assert len(self.free_small) + len(self.free_large) == self.num_large, "large pages leaked"


class VllmHybrid(HeteroMemory):
    """One block size: 16 tokens x ``group_layers`` layers; every layer group takes blocks."""

    def __init__(self, shape: HeteroShape, budget_bytes: int, watermark_fraction: float,
                 uniform: bool = False) -> None:
        super().__init__(shape, budget_bytes, watermark_fraction, "vllm_uniform" if uniform else "vllm_hybrid")
        f, s = shape.num_full, shape.num_sliding
        if uniform:  # one group of every layer, all treated as full attention
            self.group_layers, self.group_windows = f + s, [None]
        else:
            self.group_layers = min(f, s)
            self.group_windows = [None] * math.ceil(f / self.group_layers) \
                + [shape.window_tokens] * math.ceil(s / self.group_layers)
        self.padding_layers = len(self.group_windows) * self.group_layers - (f + s)
        self.block_bytes = PAGE_TOKENS * self.group_layers * shape.layer_token_bytes
        self.num_blocks = budget_bytes // self.block_bytes
        self.free_blocks = self.num_blocks
        self.blocks: dict[str, list[int]] = {}  # request -> blocks held per group

    def _need(self, tokens: int) -> list[int]:
        return [len(live_pages(tokens, w)) for w in self.group_windows]

    def _set(self, rid: str, tokens: int) -> bool:
        need = self._need(tokens)
        extra = sum(need) - sum(self.blocks[rid])
        if extra > self.free_blocks:
            return False
        self.free_blocks -= extra
        self.blocks[rid] = need
        self.tokens[rid] = tokens
        return True

    def admit(self, rid: str, num_tokens: int, prompt_tokens: int, max_new_tokens: int,
              prediction: LengthPrediction | None) -> bool:
        need = sum(self._need(num_tokens))
        if self.free_blocks - need < self.watermark_fraction * self.num_blocks:  # vLLM's watermark
            return False
        self.blocks[rid] = [0] * len(self.group_windows)
        return self._set(rid, num_tokens)

    def grow(self, rid: str, num_tokens: int) -> bool:
        return self._set(rid, num_tokens)

    def release(self, rid: str, generated_tokens: int | None) -> None:
        self.free_blocks += sum(self.blocks.pop(rid))
        self.tokens.pop(rid)

    def held_bytes(self) -> int:
        return (self.num_blocks - self.free_blocks) * self.block_bytes

    def read_runs(self, rid: str, num_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        # Sliding layers attend over the window either way (uniform only fails to free the rest).
        return _paged_runs(num_tokens), _paged_runs(min(num_tokens, self.shape.window_tokens))

    def check_integrity(self) -> None:
        assert self.num_blocks - self.free_blocks == sum(sum(b) for b in self.blocks.values()), "blocks leaked"
        assert self.free_blocks >= 0, "more blocks handed out than exist"
