"""The paged baselines for models with sliding-window layers (emulator/hetero_paged.py:
Jenga's LCM allocator, vLLM's hybrid manager, vLLM uniform) as KV policies the engine's
``Scheduler`` drives, so ``odma-mlu bench --model gemma-3-12b --policies
odma,paged,jenga,vllm_hybrid,vllm_uniform`` (and tools/bench_hetero.py, over both shapes and
traces) compares them with the engine's own layout under one scheduler, one admission rule
and the one step-cost function::

    Scheduler.reserve / ensure_capacity / release   ->  HeteroSchemePolicy  ->  scheme.admit / grow / release
    describe_step: read_runs (full layers), rings.read_runs (sliding layers), arena.take_issued_copies

The schemes are shape-only (emulator/scheme_policy.py: a location lists the request's
full-layer runs in order from slot 0, lengths, not addresses).
"""

from __future__ import annotations

from emulator.hetero_memory import HeteroMemory, HeteroShape
from emulator.hetero_paged import JengaLCM, VllmHybrid
from emulator.scheme_policy import ShapeSchemePolicy
from odma_mlu.config import CacheConfig
from odma_mlu.kvcache.policy import ReserveRequest

HETERO_BASELINES: tuple[str, ...] = ("jenga", "vllm_hybrid", "vllm_uniform")
"""Policy names only models with sliding-window layers accept (``odma-mlu bench --policies``)."""


class _SchemeRings:
    """The sliding layers' reads, as ``describe_step`` asks a windowed policy's rings."""

    def __init__(self, scheme: HeteroMemory) -> None:
        self.scheme = scheme

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        return self.scheme.read_runs(request_id, num_tokens)[1]


class HeteroSchemePolicy(ShapeSchemePolicy):
    """A paged scheme for full + sliding layers (emulator/scheme_policy.py). Token counts
    (capacity, reserved) are in tokens of every layer's K/V: the scheme's bytes over the
    model's bytes per token, as the replay counts the engine's layout."""

    swappable = True  # as the engine's layout: a preemption swaps while the swap space holds it

    def __init__(self, scheme: HeteroMemory) -> None:
        super().__init__(scheme.name, scheme.budget_bytes, scheme.shape.spec.kv_bytes_per_token)
        self.scheme = scheme
        self.rings = _SchemeRings(scheme)

    def held_tokens(self) -> dict[str, int]:
        return self.scheme.tokens

    def _admit(self, req: ReserveRequest) -> bool:
        return self.scheme.admit(req.request_id, req.num_tokens, req.prompt_tokens, req.max_new_tokens, req.prediction)

    def _grow(self, request_id: str, needed_tokens: int) -> bool:
        return self.scheme.grow(request_id, needed_tokens)

    def _held_bytes(self) -> int:
        return self.scheme.held_bytes()

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.scheme.release(request_id, generated_tokens)

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        return self.scheme.read_runs(request_id, num_tokens)[0]

    def swap_slots(self, request_id: str, kv_tokens: int) -> tuple[int, ...]:
        """What a swap of the request moves, in the engine's units (slots of the full layers,
        as the step-cost function prices swaps): its tokens in the full layers, and the last
        min(tokens, window) in the sliding ones, what resuming needs (the engine's layout
        swaps its ring rows alike)."""
        shape = self.scheme.shape
        sliding = min(kv_tokens, shape.window_tokens) * shape.num_sliding
        return kv_tokens, -(-sliding // shape.num_full)

    def max_request_tokens(self) -> int:
        """A request that holds every page of the budget in the full layers and its window in
        the sliding ones (a bound: page rounding is the scheme's)."""
        shape = self.scheme.shape
        window_bytes = shape.num_sliding * shape.window_tokens * shape.layer_token_bytes
        return max(0, (self.scheme.budget_bytes - window_bytes) // (shape.num_full * shape.layer_token_bytes))

    def check_integrity(self) -> None:
        self.scheme.check_integrity()


def make_hetero_baseline(name: str, shape: HeteroShape, budget_bytes: int,
                         cache: CacheConfig = CacheConfig()) -> HeteroSchemePolicy:
    """One of ``HETERO_BASELINES`` over ``budget_bytes``, with the common watermark."""
    wm = cache.watermark_fraction
    if name == "jenga":
        return HeteroSchemePolicy(JengaLCM(shape, budget_bytes, wm))
    if name in ("vllm_hybrid", "vllm_uniform"):
        return HeteroSchemePolicy(VllmHybrid(shape, budget_bytes, wm, uniform=name == "vllm_uniform"))
    raise ValueError(f"unknown baseline {name!r}; choose from {HETERO_BASELINES}")
