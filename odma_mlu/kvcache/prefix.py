"""Prefix caching over runs: requests sharing a prompt prefix share its KV.

``PrefixCachingPolicy`` wraps any KV policy (as ``WindowedPolicy`` does). A cached prefix
is a *block*: a placeholder reservation taken through the inner policy (so every policy,
contiguous or paged, counts it against the same arena and places it its own way), holding
the KV of prompt tokens ``[start, end)``. A sharing request's ``KVLocation`` is simply the
prefix runs first, then its own runs::

    block A: tokens [0, 256) of the system prompt        runs ((1024, 256),)
    block B: tokens [256, 320), a child of A               runs ((4096, 64),)
    request r (prompt 340 tokens, hits A and B):
        location = ((1024, 256), (4096, 64), <r's own runs: tokens 320..>)
        prefill starts at token 320 (``cached_prefix_tokens``)

Rules:
- Only prompt tokens are cached, and at most ``prompt - 1`` of them (the last prompt token
  is always computed: it gives the first logits). A reasoning model's generated text
  (``<think>`` ...) is therefore never cached for reuse; a recompute after preemption
  caches nothing beyond the prompt either.
- Prefixes are matched at ``granule_tokens`` boundaries (the paged policy's page, else 16
  tokens), by a chain hash per granule, verified token by token. A block may be shared in
  part: its first ``k`` granules are usable by a prompt that matches only them.
- A request that extends a hit (or misses) makes the rest of its cacheable prefix a new
  block (one placeholder: one run for the contiguous policies), a child of the block it hit.
  The request itself writes that block's KV in its prefill; the block is usable by others
  only up to what has been computed (``note_computed``, from the scheduler).
- Reference counts: each request holding a block, and each child block, holds a reference.
  Unreferenced blocks stay cached and are evicted least recently used first, only when an
  allocation would otherwise fail (a reservation, or a growth).
- Sliding-window rings and SSM states are not prefix-shareable: the engine refuses prefix
  caching for such models (a shared ring would need the prefix's window, a state the whole
  prefix).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from odma_mlu.kvcache.arena import KVLocation, Run
from odma_mlu.kvcache.policy import GrowResult, GrowStatus, ReserveRequest
from odma_mlu.predictor.base import LengthPrediction

BLOCK_PREFIX = "__prefix_block_"
DEFAULT_GRANULE_TOKENS = 16


@dataclass(eq=False)
class _Block:
    block_id: str
    parent: "_Block | None"
    start: int
    end: int
    tokens: tuple[int, ...]
    """Prompt tokens [0, end): verification of hash hits."""
    runs: tuple[Run, ...]
    """Runs of tokens [0, end): the parent's (cut at ``start``) then this block's own."""
    hashes: list[int] = field(default_factory=list)
    ready: int = 0
    """Tokens [0, ready) have their KV computed."""
    refs: int = 0
    last_used: int = 0


@dataclass(frozen=True)
class PrefixStats:
    query_tokens: int
    """Prompt tokens looked up (vLLM's prefix_cache_queries)."""
    hit_tokens: int
    """Of those, tokens found cached (not prefilled; vLLM's prefix_cache_hits)."""
    blocks: int
    cached_tokens: int
    evictions: int


@dataclass
class _Holder:
    prefix_tokens: int
    """Tokens [0, prefix_tokens) live in blocks; the inner policy holds the rest."""
    prefix_runs: tuple[Run, ...]
    cached_tokens: int
    """Of them, already computed at admission (the prefill starts here)."""
    blocks: list[_Block]
    own_block: _Block | None


def _cut(runs: tuple[Run, ...], tokens: int) -> tuple[Run, ...]:
    out: list[Run] = []
    left = tokens
    for start, n in runs:
        if left <= 0:
            break
        out.append((start, min(n, left)))
        left -= n
    assert left <= 0, f"cut of {tokens} tokens past runs {runs}"
    return tuple(out)


def _join(a: tuple[Run, ...], b: tuple[Run, ...]) -> tuple[Run, ...]:
    """``a`` then ``b``, merging a physically adjacent seam into one run."""
    if a and b and a[-1][0] + a[-1][1] == b[0][0]:
        return a[:-1] + ((a[-1][0], a[-1][1] + b[0][1]),) + b[1:]
    return a + b


class PrefixCachingPolicy:
    """``inner`` plus shared, reference-counted prefix blocks (see the module docstring)."""

    swappable = False  # shared prefix pages outlive a preempted request: it recomputes

    def __init__(self, inner: Any, granule_tokens: int | None = None) -> None:
        self.inner = inner
        self.granule_tokens = int(granule_tokens or getattr(inner, "page_tokens", DEFAULT_GRANULE_TOKENS))
        if self.granule_tokens <= 0:
            raise ValueError(f"granule_tokens must be >= 1, got {self.granule_tokens}")
        self._index: dict[int, tuple[_Block, int]] = {}  # chain hash of tokens [0, k*G) -> (block, k*G)
        self._blocks: dict[str, _Block] = {}
        self._holders: dict[str, _Holder] = {}
        self._pending: tuple[str, tuple[int, ...]] | None = None
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self.query_tokens = 0
        self.hit_tokens = 0
        self.evictions = 0

    def __getattr__(self, name: str) -> Any:  # name, arena, capacity_tokens, free_preemption, ...
        return getattr(self.inner, name)

    # -- lookup --------------------------------------------------------------------------
    def set_prompt_tokens(self, request_id: str, token_ids: "tuple[int, ...] | list[int] | None") -> None:
        """The prompt of the request the scheduler is about to ``reserve`` (None: shape-only)."""
        self._pending = (request_id, tuple(token_ids)) if token_ids is not None else None

    def _chain(self, tokens: tuple[int, ...], granules: int) -> list[int]:
        g, h, out = self.granule_tokens, 0, []
        for k in range(granules):
            h = hash((h, tokens[k * g:(k + 1) * g]))
            out.append(h)
        return out

    def _match(self, tokens: tuple[int, ...], hashes: list[int]) -> tuple[_Block | None, int]:
        """The longest computed prefix at a granule boundary: by chain hash, then verified."""
        best: tuple[_Block | None, int] = (None, 0)
        for h in hashes:
            hit = self._index.get(h)
            if hit is None or hit[0].ready < hit[1]:
                break
            best = hit
        block, upto = best
        if block is not None and block.tokens[:upto] != tokens[:upto]:
            return None, 0  # a hash collision: treat as a miss
        return best

    # -- the policy interface ----------------------------------------------------------
    def can_reserve(self, req: ReserveRequest) -> bool:
        return self.inner.can_reserve(req)

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        pending, self._pending = self._pending, None
        tokens = pending[1] if pending is not None and pending[0] == req.request_id else None
        g = self.granule_tokens
        prefix = ((min(req.prompt_tokens, len(tokens)) - 1) // g) * g if tokens else 0
        hashes = self._chain(tokens, prefix // g) if tokens and prefix > 0 else []
        hit, cached = self._match(tokens, hashes) if tokens and hashes else (None, 0)
        held: list[_Block] = []

        def hold(block: _Block | None) -> None:  # references protect the chain from eviction
            while block is not None:
                block.refs += 1
                block.last_used = next(self._clock)
                held.append(block)
                block = block.parent

        hold(hit)
        own = self._new_block(tokens, hit, cached, prefix, hashes) if tokens and prefix > cached else None
        if own is not None:
            own.refs += 1
            held.insert(0, own)
        prefix_tokens = own.end if own is not None else cached
        chain = own if own is not None else hit
        runs = _cut(chain.runs, prefix_tokens) if chain is not None else ()
        inner_req = ReserveRequest(req.request_id, req.prompt_tokens - prefix_tokens, req.max_new_tokens,
                                   req.num_tokens - prefix_tokens, req.prediction, req.true_output_tokens)
        loc = self._with_eviction(lambda: self.inner.reserve(inner_req))
        if loc is None:
            for b in held:
                b.refs -= 1
            if own is not None:
                self._drop(own)
            return None
        self._holders[req.request_id] = _Holder(prefix_tokens, runs, cached, held, own)
        if tokens:
            self.query_tokens += req.prompt_tokens
            self.hit_tokens += cached
        return KVLocation(_join(runs, loc.runs))

    def _new_block(self, tokens: tuple[int, ...] | None, parent: _Block | None, start: int, end: int,
                   hashes: list[int]) -> _Block | None:
        """A placeholder of tokens [start, end) after ``parent`` (None: no room, no block)."""
        assert tokens is not None
        block_id = f"{BLOCK_PREFIX}{next(self._ids)}"
        size = end - start
        req = ReserveRequest(block_id, size, 1, size, LengthPrediction.from_values([1.0] * 5, 1), 1,
                             pinned=True)  # sharers keep the block's runs: never moved
        loc = self._with_eviction(lambda: self.inner.reserve(req))
        if loc is None:
            return None
        parent_runs = _cut(parent.runs, start) if parent is not None else ()
        block = _Block(block_id, parent, start, end, tokens[:end], _join(parent_runs, _cut(loc.runs, size)),
                       ready=start)
        if parent is not None:
            parent.refs += 1
        g = self.granule_tokens
        for k in range(start // g, end // g):
            if hashes[k] not in self._index:
                self._index[hashes[k]] = (block, (k + 1) * g)
                block.hashes.append(hashes[k])
        self._blocks[block_id] = block
        return block

    def _with_eviction(self, attempt: Any) -> Any:
        """``attempt()``; while it finds no room, evict the least recently used unreferenced
        block and try again."""
        while True:
            out = attempt()
            ok = out is not None and not (isinstance(out, GrowResult) and out.status == GrowStatus.NO_ROOM)
            if ok or not self._evict_one():
                return out

    def _evict_one(self) -> bool:
        free = [b for b in self._blocks.values() if b.refs == 0]
        if not free:
            return False
        self._drop(min(free, key=lambda b: b.last_used))
        self.evictions += 1
        return True

    def _drop(self, block: _Block) -> None:
        assert block.refs == 0, f"block {block.block_id} dropped with {block.refs} references"
        for h in block.hashes:
            if self._index.get(h, (None,))[0] is block:
                del self._index[h]
        del self._blocks[block.block_id]
        self.inner.release(block.block_id, None)
        if block.parent is not None:
            block.parent.refs -= 1

    def cached_prefix_tokens(self, request_id: str) -> int:
        """Tokens of the request already in KV at admission: its prefill starts here."""
        h = self._holders.get(request_id)
        return h.cached_tokens if h is not None else 0

    def note_computed(self, request_id: str, kv_tokens: int) -> None:
        """The request's KV is computed up to ``kv_tokens``: its own block becomes shareable."""
        h = self._holders.get(request_id)
        if h is not None and h.own_block is not None:
            b = h.own_block
            b.ready = max(b.ready, min(kv_tokens, b.end))

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        own = needed_tokens - self._holders[request_id].prefix_tokens
        if own <= 0:
            return GrowResult(GrowStatus.OK)
        return self._with_eviction(lambda: self.inner.ensure_capacity(request_id, own))

    def location(self, request_id: str) -> KVLocation:
        return KVLocation(_join(self._holders[request_id].prefix_runs, self.inner.location(request_id).runs))

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        h = self._holders[request_id]
        if self.inner.free_preemption:  # ideal: every read is one sequential run
            return (num_tokens,)
        if num_tokens <= h.prefix_tokens:
            return tuple(n for _, n in _cut(h.prefix_runs, num_tokens))
        return tuple(n for _, n in h.prefix_runs) + self.inner.read_runs(request_id, num_tokens - h.prefix_tokens)

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.inner.release(request_id, generated_tokens)
        h = self._holders.pop(request_id)
        for b in h.blocks:
            b.refs -= 1
        own = h.own_block
        if own is not None and own.refs == 0 and own.ready <= own.start:
            self._drop(own)  # nothing of it was computed: useless to keep

    # -- accounting ---------------------------------------------------------------------
    def num_live(self) -> int:
        return self.inner.num_live() - len(self._blocks)

    def clear(self) -> None:
        """Evict every unreferenced block."""
        while self._evict_one():
            pass

    def prefix_stats(self) -> PrefixStats:
        return PrefixStats(self.query_tokens, self.hit_tokens, len(self._blocks),
                           sum(b.end - b.start for b in self._blocks.values()), self.evictions)

    def check_integrity(self) -> None:
        self.inner.check_integrity()
        refs = {b.block_id: 0 for b in self._blocks.values()}
        for h in self._holders.values():
            for b in h.blocks:
                refs[b.block_id] += 1
        for b in self._blocks.values():
            if b.parent is not None:
                assert b.parent.block_id in self._blocks, f"block {b.block_id} outlived its parent"
                refs[b.parent.block_id] += 1
            assert b.start <= b.ready <= b.end, f"block {b.block_id}: ready {b.ready} outside [{b.start}, {b.end}]"
        for b in self._blocks.values():
            assert b.refs == refs[b.block_id], f"block {b.block_id}: {b.refs} references counted, {refs[b.block_id]} held"
        for h, (b, upto) in self._index.items():
            assert b.block_id in self._blocks and upto <= b.end, "the prefix index points at a dropped block"
