"""The paged baselines for models with sliding-window layers (emulator/hetero_paged.py:
Jenga's LCM allocator, vLLM's hybrid manager, vLLM uniform) as KV policies the engine's
``Scheduler`` drives, so ``odma-mlu bench --model gemma-3-12b --policies
odma,paged,jenga,vllm_hybrid,vllm_uniform`` (and tools/bench_hetero.py, over both shapes and
traces) compares them with the engine's own layout under one scheduler, one admission rule
and the one step-cost function::

    Scheduler.reserve / ensure_capacity / release   ->  HeteroSchemePolicy  ->  scheme.admit / grow / release
    describe_step: read_runs (full layers), rings.read_runs (sliding layers), arena.take_issued_copies

The schemes are shape-only and keep page counts, not a slot space, so a location lists the
request's full-layer runs in order from slot 0: lengths, not addresses (the replay reads
lengths only; nothing runs tensors through these policies).
"""

from __future__ import annotations

from emulator.hetero_memory import HeteroMemory, HeteroShape
from emulator.hetero_paged import JengaLCM, VllmHybrid
from odma_mlu.config import CacheConfig
from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.kvcache.policy import GrowResult, GrowStatus, PolicyStats, ReserveRequest

HETERO_BASELINES: tuple[str, ...] = ("jenga", "vllm_hybrid", "vllm_uniform")
"""Policy names only models with sliding-window layers accept (``odma-mlu bench --policies``)."""


class NoCopies:
    """What ``describe_step`` drains from a policy's arena: the copies issued and the bytes
    moved (``migrated_bytes``); none here, the paged schemes never move KV."""

    moved_bytes = 0

    def take_issued_copies(self) -> tuple[int, ...]:
        return ()


class _SchemeRings:
    """The sliding layers' reads, as ``describe_step`` asks a windowed policy's rings."""

    def __init__(self, scheme: HeteroMemory) -> None:
        self.scheme = scheme

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        return self.scheme.read_runs(request_id, num_tokens)[1]


class HeteroSchemePolicy:
    """A paged scheme for full + sliding layers, behind the KV policy interface. Token counts
    (capacity, reserved) are in tokens of every layer's K/V: the scheme's bytes over the
    model's bytes per token, as the replay counts the engine's layout."""

    uses_prediction = False
    free_preemption = False
    stream_reads = False
    can_run_out_of_room = True

    def __init__(self, scheme: HeteroMemory) -> None:
        self.scheme = scheme
        self.name = scheme.name
        self.bytes_per_token = scheme.shape.spec.kv_bytes_per_token
        self.capacity_tokens = scheme.budget_bytes // self.bytes_per_token
        self.arena = NoCopies()
        self.rings = _SchemeRings(scheme)
        self.overflowed_requests = 0

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        assert req.request_id not in self.scheme.tokens, f"request {req.request_id} already holds KV"
        if not self.scheme.admit(req.request_id, req.num_tokens, req.prompt_tokens, req.max_new_tokens,
                                 req.prediction):
            return None
        return self.location(req.request_id)

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        if needed_tokens <= self.scheme.tokens[request_id]:
            return GrowResult(GrowStatus.OK)
        if not self.scheme.grow(request_id, needed_tokens):
            return GrowResult(GrowStatus.NO_ROOM)
        return GrowResult(GrowStatus.OK, 0, "pages")

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.scheme.release(request_id, generated_tokens)

    def location(self, request_id: str) -> KVLocation:
        runs, start = [], 0
        for n in self.read_runs(request_id, self.scheme.tokens[request_id]):
            runs.append((start, n))
            start += n
        return KVLocation(tuple(runs))

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        return self.scheme.read_runs(request_id, num_tokens)[0]

    def reserved_tokens(self) -> int:
        return self.scheme.held_bytes() // self.bytes_per_token

    def max_request_tokens(self) -> int:
        """A request that holds every page of the budget in the full layers and its window in
        the sliding ones (a bound: page rounding is the scheme's)."""
        shape = self.scheme.shape
        window_bytes = shape.num_sliding * shape.window_tokens * shape.layer_token_bytes
        return max(0, (self.scheme.budget_bytes - window_bytes) // (shape.num_full * shape.layer_token_bytes))

    def num_live(self) -> int:
        return len(self.scheme.tokens)

    def check_integrity(self) -> None:
        self.scheme.check_integrity()

    def stats(self) -> PolicyStats:
        return PolicyStats(self.name, self.capacity_tokens, self.reserved_tokens(), self.num_live(), 0, 0, 0, 0, 0)


def make_hetero_baseline(name: str, shape: HeteroShape, budget_bytes: int,
                         cache: CacheConfig = CacheConfig()) -> HeteroSchemePolicy:
    """One of ``HETERO_BASELINES`` over ``budget_bytes``, with the common watermark."""
    wm = cache.watermark_fraction
    if name == "jenga":
        return HeteroSchemePolicy(JengaLCM(shape, budget_bytes, wm))
    if name in ("vllm_hybrid", "vllm_uniform"):
        return HeteroSchemePolicy(VllmHybrid(shape, budget_bytes, wm, uniform=name == "vllm_uniform"))
    raise ValueError(f"unknown baseline {name!r}; choose from {HETERO_BASELINES}")
