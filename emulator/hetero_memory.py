"""Shape-only KV memory schemes for models with full and sliding-window layers.

All schemes draw from one byte budget and answer the replay (emulator/hetero_replay.py)
through the same calls: ``admit`` (prompt KV, under the same free-memory watermark),
``grow`` (room for one more token), ``release``, the bytes held and live, and the runs a
decode reads per group. ``F`` full layers, ``S`` sliding layers of window ``W``, ``b`` bytes
of K+V per token per layer::

    odma_rings        one extent space (ODMA's policy over an arena of F-layer token slots);
                      a request's full KV is ODMA's slab, its ring a second slab of
                      ceil(min(tokens, W) * S / F) slots that grows in place up to W and
                      then wraps (no eviction copy). Sliding reads: one run per ring part.
    odma_engine_rings the engine's layout (odma_mlu/kvcache/window.py, WindowedPolicy):
                      as odma_rings, one ODMA arena of F-layer slots over the whole budget
                      and the ring a second ODMA request, but laid out as the engine's
                      forward reads it: flat lanes, blocks of B = 16 ring slots, block b of
                      sliding layer j is cell b S + j, F cells to a B-row row-block: a ring
                      of n blocks holds ceil(n S / F) B rows (rounded up to whole blocks
                      and row-blocks where odma_rings rounds S / F per slot). Sliding reads:
                      sliding layer 0's runs of the ring (one per block).
    jenga             Jenga's two-level allocator: large pages of LCM(16 F b, 16 S b) bytes,
                      carved into per-group small pages of 16 tokens; a request's small pages
                      go to a large page it already uses when possible (request-aware); a large
                      page returns to the pool when all its small pages are free; pages that
                      left the window are freed (per-group eviction).
    vllm_hybrid       vLLM's hybrid manager: one block size; layers split into groups of
                      g = min(F, S) layers (the last group of a type padded to g); every group
                      takes blocks of 16 tokens x g layers from one pool; sliding groups free
                      blocks that left the window.
    vllm_uniform      vLLM before the hybrid manager (Jenga's baseline): every layer keeps
                      every token in 16-token blocks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from emulator.cost_model import CostModel
from odma_mlu.config import CacheConfig, ModelSpec
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.factory import make_policy
from odma_mlu.kvcache.policy import GrowStatus, ReserveRequest
from odma_mlu.kvcache.window import RING_BLOCK_TOKENS, RingPool
from odma_mlu.kvcache.windowed import WindowedPolicy
from odma_mlu.models.layer_kinds import LayerKinds
from odma_mlu.predictor.base import QUANTILES, LengthPrediction

PAGE_TOKENS = 16


@dataclass(frozen=True)
class HeteroShape:
    spec: ModelSpec
    windows: tuple[int | None, ...]

    @property
    def num_full(self) -> int:
        return sum(w is None for w in self.windows)

    @property
    def num_sliding(self) -> int:
        return len(self.windows) - self.num_full

    @property
    def window_tokens(self) -> int:
        return next(w for w in self.windows if w is not None)

    @property
    def layer_token_bytes(self) -> int:
        return self.spec.kv_bytes_per_token_per_layer

    @property
    def kinds(self) -> LayerKinds:
        """What the step-cost function prices: full and sliding layers."""
        return LayerKinds.from_windows(self.windows)

    def layers_spec(self, num_layers: int) -> ModelSpec:
        """The spec cut to ``num_layers`` layers: the shape of an arena of full layers."""
        return dataclasses.replace(self.spec, num_layers=num_layers)

    def live_bytes(self, tokens: int) -> int:
        """K/V a request of ``tokens`` must keep: every token in full layers, the window in sliding ones."""
        return (self.num_full * tokens + self.num_sliding * min(tokens, self.window_tokens)) * self.layer_token_bytes


@dataclass
class Counters:
    preempt_no_room: int = 0
    copied_tokens: int = 0


@dataclass
class HeteroMemory:
    """Base: the replay's interface. Token counts are KV tokens of the request."""

    shape: HeteroShape
    budget_bytes: int
    watermark_fraction: float
    name: str = "abstract"
    counters: Counters = field(default_factory=Counters)
    pending_copy_tokens: list[int] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)

    def admit(self, rid: str, num_tokens: int, prompt_tokens: int, max_new_tokens: int,
              prediction: LengthPrediction | None) -> bool: ...

    def grow(self, rid: str, num_tokens: int) -> bool: ...

    def release(self, rid: str, generated_tokens: int | None) -> None: ...

    def held_bytes(self) -> int: ...

    def read_runs(self, rid: str, num_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(full-layer runs, sliding-layer runs) in tokens of the decode read of ``num_tokens``."""
        ...

    def check_integrity(self) -> None: ...

    def live_bytes(self) -> int:
        return sum(self.shape.live_bytes(t) for t in self.tokens.values())


def _paged_runs(tokens: int, page: int = PAGE_TOKENS) -> tuple[int, ...]:
    full, rest = divmod(tokens, page)
    return (page,) * full + ((rest,) if rest else ())


def ring_token_runs(slot_runs: tuple[int, ...], slots_per_token: float, tokens: int) -> tuple[int, ...]:
    """Tokens of each sliding layer in each part of a ring slab (``slot_runs``: the parts'
    lengths in F-layer slots, ``slots_per_token`` = S / F), apportioned by the parts'
    cumulative slots so that they add up to ``tokens``; parts holding no whole token drop."""
    out: list[int] = []
    cum_slots, cum_tokens = 0, 0
    for n in slot_runs:
        cum_slots += n
        upto = min(tokens, round(cum_slots / slots_per_token))
        if upto > cum_tokens:
            out.append(upto - cum_tokens)
            cum_tokens = upto
    if cum_tokens < tokens:  # the last part holds the rest (its slots were rounded up for it)
        if out:
            out[-1] += tokens - cum_tokens
        else:
            out.append(tokens)
    return tuple(out)


# -- ODMA --------------------------------------------------------------------------------
class OdmaRings(HeteroMemory):
    """Full slabs and rings as two ODMA requests in one arena of F-layer token slots."""

    def __init__(self, shape: HeteroShape, budget_bytes: int, cache: CacheConfig, max_new_tokens: int,
                 cost: CostModel) -> None:
        super().__init__(shape, budget_bytes, cache.watermark_fraction, "odma_rings")
        assert shape.num_full > 0, "odma_rings keeps rings in the full layers' arena"
        slot_bytes = shape.num_full * shape.layer_token_bytes
        self.arena = KVArena(shape.layers_spec(shape.num_full), budget_bytes // slot_bytes, shape_only=True)
        self.policy = make_policy("odma", self.arena, cache, max_new_tokens, run_cost=cost)
        self.ratio = shape.num_sliding / shape.num_full
        self.max_new_tokens = max_new_tokens

    def _ring_slots(self, tokens: float) -> int:
        return max(1, math.ceil(min(tokens, self.shape.window_tokens) * self.ratio))

    def admit(self, rid: str, num_tokens: int, prompt_tokens: int, max_new_tokens: int,
              prediction: LengthPrediction | None) -> bool:
        if self.policy.reserve(ReserveRequest(rid, prompt_tokens, max_new_tokens, num_tokens, prediction)) is None:
            return False
        ring_now, ring_max = self._ring_slots(num_tokens), self._ring_slots(prompt_tokens + max_new_tokens)
        ring_prompt = self._ring_slots(prompt_tokens)
        ring_pred = None
        if prediction is not None:  # the ring's predicted growth: the request's, through min(., W) * S / F
            ring_pred = LengthPrediction.from_values(
                [self._ring_slots(prompt_tokens + prediction.at(q)) - ring_prompt for q in QUANTILES],
                max(1, ring_max - ring_prompt), QUANTILES)
        ring_req = ReserveRequest(rid + "#ring", ring_prompt, max(1, ring_max - ring_prompt), ring_now, ring_pred)
        if self.policy.reserve(ring_req) is None:
            self.policy.release(rid, None)
            return False
        self.tokens[rid] = num_tokens
        return True

    def grow(self, rid: str, num_tokens: int) -> bool:
        if self.policy.ensure_capacity(rid, num_tokens).status != GrowStatus.OK:
            return False
        if self.policy.ensure_capacity(rid + "#ring", self._ring_slots(num_tokens)).status != GrowStatus.OK:
            return False
        self.tokens[rid] = num_tokens
        self.pending_copy_tokens.extend(self.arena.take_issued_copies())
        return True

    def release(self, rid: str, generated_tokens: int | None) -> None:
        self.policy.release(rid, generated_tokens)
        self.policy.release(rid + "#ring", None)
        self.tokens.pop(rid)

    def held_bytes(self) -> int:
        return self.policy.reserved_tokens() * self.shape.num_full * self.shape.layer_token_bytes

    def read_runs(self, rid: str, num_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ring = self.policy.read_runs(rid + "#ring", self._ring_slots(num_tokens))
        # A ring slab of n F-layer slots holds n / ratio tokens of each sliding layer: the
        # parts' token counts are apportioned so that they add up to the min(tokens, W) the
        # ring holds (rounding each part on its own, 16 slots / 5 -> 3 tokens, read 6% less).
        return self.policy.read_runs(rid, num_tokens), ring_token_runs(ring, self.ratio,
                                                                       min(num_tokens, self.shape.window_tokens))

    def check_integrity(self) -> None:
        self.policy.check_integrity()


class OdmaEngineRings(HeteroMemory):
    """The engine's layout (odma_mlu/kvcache/window.py): one shape-only arena of F-layer
    slots over the whole budget, ``WindowedPolicy`` over ODMA; each request's ring is ODMA's
    second request ``<id>#ring`` of ceil(n S / F) * B rows (n = ceil(C / B) blocks of
    B = min(16, W) ring slots, C = the ring's slots; flat lanes, no group padding)."""

    def __init__(self, shape: HeteroShape, budget_bytes: int, cache: CacheConfig, max_new_tokens: int,
                 cost: CostModel, block_tokens: int = RING_BLOCK_TOKENS) -> None:
        super().__init__(shape, budget_bytes, cache.watermark_fraction, "odma_engine_rings")
        assert shape.num_full > 0, "the engine keeps rings in the full layers' arena"
        self.slot_bytes = shape.num_full * shape.layer_token_bytes
        self.arena = KVArena(shape.layers_spec(shape.num_full), budget_bytes // self.slot_bytes, shape_only=True)
        self.rings = RingPool(self.arena, shape.num_sliding, shape.window_tokens, block_tokens)
        self.policy = WindowedPolicy(make_policy("odma", self.arena, cache, max_new_tokens, run_cost=cost),
                                     self.rings)

    def admit(self, rid: str, num_tokens: int, prompt_tokens: int, max_new_tokens: int,
              prediction: LengthPrediction | None) -> bool:
        ok = self.policy.reserve(ReserveRequest(rid, prompt_tokens, max_new_tokens, num_tokens, prediction))
        if ok is not None:
            self.tokens[rid] = num_tokens
        return ok is not None

    def grow(self, rid: str, num_tokens: int) -> bool:
        if self.policy.ensure_capacity(rid, num_tokens).status != GrowStatus.OK:
            return False
        self.tokens[rid] = num_tokens
        self.pending_copy_tokens.extend(self.arena.take_issued_copies())
        return True

    def release(self, rid: str, generated_tokens: int | None) -> None:
        self.policy.release(rid, generated_tokens)
        self.tokens.pop(rid)

    def held_bytes(self) -> int:
        return self.policy.reserved_tokens() * self.slot_bytes  # requests and rings alike

    def read_runs(self, rid: str, num_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        # As the engine (window_attention.py, step_work._sliding_reads): sliding layer 0's runs of the ring.
        return self.policy.read_runs(rid, num_tokens), self.rings.read_runs(rid, num_tokens)

    def check_integrity(self) -> None:
        self.policy.check_integrity()
