"""A hybrid (SSM + attention) model's memory as the engine holds it, and the schemes it is
compared with, as KV policies the engine's ``Scheduler`` drives (emulator/replay.py), so
``odma-mlu bench --model bamba-9b`` and tools/bench_hybrid.py compare them under one
scheduler, one admission watermark and the one step-cost function::

    odma, paged, ... (POLICY_NAMES)  the engine's layout (LLMEngine): the named policy over the
                                     attention layers' arena, wrapped in AvmpPolicy with a state
                                     pool that starts empty; capacity moves on failure
    avmp                             AvmpPolicy over ``paged`` (16-token pages), the pool started
                                     at the tuned split, capacity moved one slot at a time
    static_split_0.5                 AvmpPolicy over ``paged``, migrate=False: half the budget in
                                     state slots for good (AVMP's ``fixed_dual_mr05`` baseline)
    static_split_tuned               the same at the tuned split (``tuned_state_fraction``)
    padded_unified                   vLLM's hybrid manager: one pool of padded pages
                                     (emulator/hybrid_pools.py)

The budget is ``capacity_tokens`` tokens of the attention layers' K/V; states take their
bytes out of it (AvmpPolicy's loans, or padded pages).
"""

from __future__ import annotations

from typing import Any

import torch

from emulator.hybrid_pools import PaddedUnified
from emulator.scheme_policy import ShapeSchemePolicy
from emulator.traces import Trace
from odma_mlu.config import CacheConfig
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.avmp import AvmpPolicy
from odma_mlu.kvcache.factory import POLICY_NAMES, make_policy
from odma_mlu.kvcache.run_pricing import RunCost
from odma_mlu.kvcache.policy import ReserveRequest
from odma_mlu.kvcache.state_pool import StatePool
from odma_mlu.models.hybrid_spec import HybridSpec

HYBRID_BASELINES: tuple[str, ...] = ("avmp", "static_split_0.5", "static_split_tuned", "padded_unified")
"""Policy names only hybrid (SSM) models accept (``odma-mlu bench --policies``)."""
_FIXED_STATE_FRACTION = {"static_split_0.5": 0.5}


def tuned_state_fraction(hybrid: HybridSpec, trace: Trace) -> float:
    """The static split a careful operator would pick from ``trace``'s mean request: the
    state's share of a request's memory at half its output (mean live length)."""
    reqs = trace.requests
    mean_tokens = sum(r.prompt_tokens + r.output_tokens / 2 for r in reqs) / len(reqs)
    state = hybrid.state_bytes_per_request
    return state / (state + mean_tokens * hybrid.kv_bytes_per_token)


class PaddedUnifiedPolicy(ShapeSchemePolicy):
    """``PaddedUnified`` behind the KV policy interface (emulator/scheme_policy.py). Token
    counts are in tokens of the attention layers' K/V: bytes over
    ``HybridSpec.kv_bytes_per_token``; ``reserved_tokens`` counts the padded state pages too
    (they hold the states)."""

    def __init__(self, pool: PaddedUnified) -> None:
        super().__init__(pool.name, pool.budget_bytes, pool.hybrid.kv_bytes_per_token)
        self.pool = pool

    def held_tokens(self) -> dict[str, int]:
        return self.pool.tokens

    def _admit(self, req: ReserveRequest) -> bool:
        return self.pool.admit(req.request_id, req.num_tokens)

    def _grow(self, request_id: str, needed_tokens: int) -> bool:
        return self.pool.grow(request_id, needed_tokens)

    def _held_bytes(self) -> int:
        return self.pool.held_bytes()

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.pool.release(request_id)

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        return self.pool.read_runs(num_tokens)

    def max_request_tokens(self) -> int:
        return self.pool.max_request_tokens()

    def check_integrity(self) -> None:
        self.pool.check_integrity()

    def stats_extra(self) -> dict[str, float]:
        return {"block_tokens": float(self.pool.block_tokens), "state_padding_ratio": self.pool.padding_ratio()}


def make_hybrid_policy(name: str, hybrid: HybridSpec, capacity_tokens: int, cache: CacheConfig, max_new_tokens: int,
                       *, state_fraction: float, drift_detector: object | None = None,
                       run_cost: RunCost | None = None) -> Any:
    """The policy ``name`` (``POLICY_NAMES`` or ``HYBRID_BASELINES``) over ``capacity_tokens``
    tokens of ``hybrid``'s attention K/V, shape only. ``state_fraction``: the tuned split's
    state share (``avmp``'s start, ``static_split_tuned``)."""
    if name == "padded_unified":
        return PaddedUnifiedPolicy(PaddedUnified(hybrid, capacity_tokens * hybrid.kv_bytes_per_token,
                                                 cache.watermark_fraction))
    if name not in POLICY_NAMES + HYBRID_BASELINES:
        raise ConfigError(f"policy {name!r} for hybrid {hybrid.base.name}: choose from "
                          f"{','.join(POLICY_NAMES + HYBRID_BASELINES)}")
    if not 0.0 <= state_fraction < 1.0:
        raise ConfigError(f"state_fraction {state_fraction}: must lie in [0, 1)")
    arena = KVArena(hybrid.kv_spec, capacity_tokens, shape_only=True)
    states = StatePool(hybrid, 0, dtype=getattr(torch, hybrid.base.dtype), shape_only=True)
    if name in POLICY_NAMES:  # as LLMEngine builds a hybrid: the pool starts empty, capacity moves
        inner = make_policy(name, arena, cache, max_new_tokens, drift_detector, run_cost=run_cost)
        return AvmpPolicy(inner, states, hybrid.kv_bytes_per_token)
    fraction = _FIXED_STATE_FRACTION.get(name, state_fraction)
    slots = int(fraction * capacity_tokens * hybrid.kv_bytes_per_token) // hybrid.state_bytes_per_request
    inner = make_policy("paged", arena, cache, max_new_tokens)
    return AvmpPolicy(inner, states, hybrid.kv_bytes_per_token, state_slots=slots, migrate=name == "avmp")
