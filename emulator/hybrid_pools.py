"""vLLM's hybrid KV manager for an SSM + attention model, shape only: one pool of equal pages.

A request of a hybrid model needs KV for its tokens in the attention layers and one fixed
state for all SSM layers. vLLM holds both in one pool of equal pages::

    [ one pool of equal pages ]   a page holds ``block_tokens`` tokens of one attention
                                  layer; block_tokens is raised (multiple of 16) until a
                                  page also holds one SSM layer's state; each SSM layer's
                                  state takes one (padded) page

The other schemes compared (static split, AVMP) are the engine's own ``AvmpPolicy``
(odma_mlu/kvcache/avmp.py); emulator/hybrid_policy.py builds all of them as KV policies the
engine's ``Scheduler`` drives.
"""

from __future__ import annotations

import math

from odma_mlu.models.hybrid_spec import HybridSpec


def vllm_block_tokens(hybrid: HybridSpec, multiple_tokens: int = 16) -> int:
    """vLLM's hybrid rule: the smallest multiple of 16 tokens whose one-layer attention page
    holds one SSM layer's state."""
    per_token_layer = hybrid.base.kv_bytes_per_token_per_layer
    return math.ceil(hybrid.state_bytes_per_layer / per_token_layer / multiple_tokens) * multiple_tokens


class PaddedUnified:
    """One pool of equal pages (vLLM's hybrid KV manager): a page is one layer's
    ``block_tokens`` tokens of KV, or one SSM layer's state padded to the page. Admission
    keeps ``watermark_fraction`` of the pages free (vLLM's watermark); growth may use them."""

    name = "padded_unified"

    def __init__(self, hybrid: HybridSpec, budget_bytes: int, watermark_fraction: float) -> None:
        self.hybrid = hybrid
        self.budget_bytes = int(budget_bytes)
        self.block_tokens = vllm_block_tokens(hybrid)
        self.page_bytes = self.block_tokens * hybrid.base.kv_bytes_per_token_per_layer
        self.num_pages = self.budget_bytes // self.page_bytes
        self.watermark_pages = int(watermark_fraction * self.num_pages)
        self.used_pages = 0
        self.tokens: dict[str, int] = {}
        """Tokens each live request's KV pages cover."""
        self._held_pages: dict[str, int] = {}

    def pages_for(self, tokens: int) -> int:
        """A request's pages: a block per ``block_tokens`` tokens in each attention layer, a page per SSM layer."""
        h = self.hybrid
        return h.num_ssm_layers + h.num_attention_layers * math.ceil(tokens / self.block_tokens)

    def max_request_tokens(self) -> int:
        """The most tokens one request can be admitted with (the watermark kept free)."""
        h = self.hybrid
        blocks = (self.num_pages - self.watermark_pages - h.num_ssm_layers) // h.num_attention_layers
        return max(0, blocks * self.block_tokens)

    def admit(self, request_id: str, tokens: int) -> bool:
        """Pages for ``tokens`` and the states; False (nothing held) under the watermark."""
        assert request_id not in self._held_pages, f"request {request_id} already holds pages"
        need = self.pages_for(tokens)
        if self.num_pages - self.used_pages - need < self.watermark_pages:
            return False
        self.used_pages += need
        self._held_pages[request_id] = need
        self.tokens[request_id] = tokens
        return True

    def grow(self, request_id: str, tokens: int) -> bool:
        """Make the request's pages cover ``tokens``; False when the pool has too few pages."""
        extra = self.pages_for(tokens) - self._held_pages[request_id]
        if extra > 0:
            if self.used_pages + extra > self.num_pages:
                return False
            self.used_pages += extra
            self._held_pages[request_id] += extra
        self.tokens[request_id] = tokens
        return True

    def release(self, request_id: str) -> None:
        self.used_pages -= self._held_pages.pop(request_id, 0)
        self.tokens.pop(request_id, None)

    def read_runs(self, tokens: int) -> tuple[int, ...]:
        """The runs a decode over ``tokens`` reads in each attention layer: its blocks."""
        full, rest = divmod(tokens, self.block_tokens)
        return (self.block_tokens,) * full + ((rest,) if rest else ())

    def held_bytes(self) -> int:
        """Bytes of the pages requests hold (KV blocks and padded states)."""
        return self.used_pages * self.page_bytes

    def padding_ratio(self) -> float:
        """Page bytes per SSM layer over the state's own bytes (how much a state is padded)."""
        return self.page_bytes / self.hybrid.state_bytes_per_layer

    def check_integrity(self) -> None:
        assert self.used_pages == sum(self._held_pages.values()) <= self.num_pages, "page count drifted"
        assert self._held_pages.keys() == self.tokens.keys(), "page and token maps disagree"
