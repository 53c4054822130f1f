"""Full-scale trace replay: the real scheduler and KV policies, a shape-only runner, and
the cost model's clock.

Each step: ``scheduler.schedule()`` -> ``describe_step`` (prefill chunks with their cached
tokens, decode runs, attention groups, KV copies as issued) -> the one step-cost function
-> every sequence that samples this step (decodes, and prefills whose chunk reaches their
last token) gains one token -> a sequence ends at its trace length ->
``scheduler.postprocess``. Nothing here re-implements allocation or scheduling.

A model with sliding-window layers (``layers`` with ``num_sliding``) is replayed in the
engine's layout (``LLMEngine``): the whole budget as an arena of full-layer slots under the
named policy, each request's ring a second request of that policy laid into the arena's
lanes (``RingPool``, ``WindowedPolicy``: odma_mlu/kvcache/window.py); every step is priced
with the layer kinds. There the policies ``jenga``, ``vllm_hybrid`` and ``vllm_uniform``
(emulator/hetero_policy.py) run the paged baselines over the same byte budget under the
same scheduler. Token counts (capacity, live, reserved) are then in tokens of *every*
layer's K/V, so ``kv_utilization`` is the share of the byte budget that live K/V fills, as
for a full-attention model.

A hybrid (SSM + attention) model (``layers.ssm``) is replayed in the engine's layout too:
the named policy over the attention layers' arena, wrapped in ``AvmpPolicy`` with a state
pool, and the hybrid schemes ``avmp``, ``static_split_0.5``, ``static_split_tuned`` and
``padded_unified`` (emulator/hybrid_policy.py) over the same byte budget. Token counts are
then in tokens of the attention layers' K/V, and a running request's state counts at its
bytes in live and reserved tokens, so ``kv_utilization`` is the share of the budget that
live KV and states fill.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from emulator.cost_model import CostModel
from emulator.hetero_memory import HeteroShape
from emulator.hetero_policy import HETERO_BASELINES, make_hetero_baseline
from emulator.hybrid_policy import HYBRID_BASELINES, make_hybrid_policy, tuned_state_fraction
from emulator.profile import DeviceProfile
from emulator.traces import Trace, TraceRequest
from odma_mlu.config import CacheConfig, ModelSpec, SchedulerConfig
from odma_mlu.engine.request import Sequence
from odma_mlu.engine.scheduler import Scheduler
from odma_mlu.engine.step_work import describe_step
from odma_mlu.errors import ConfigError, RequestRejected
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.factory import make_policy
from odma_mlu.kvcache.window import RingPool
from odma_mlu.kvcache.windowed import WindowedPolicy
from odma_mlu.models.layer_kinds import LayerKinds
from odma_mlu.predictor.base import LengthPredictor, RequestFeatures

GIB = 1024**3


def kv_bytes_per_token(model: ModelSpec, layers: LayerKinds | None) -> int:
    """Bytes of the unit the replay counts capacity in: one token of every layer's K/V, or for
    a hybrid (``layers.ssm``) of its attention layers' K/V."""
    hybrid = layers.ssm if layers is not None else None
    return hybrid.kv_bytes_per_token if hybrid is not None else model.kv_bytes_per_token


def kv_capacity_tokens(profile: DeviceProfile, model: ModelSpec, cache: CacheConfig,
                       kv_gib: float | None = None, layers: LayerKinds | None = None) -> int:
    """KV tokens that fit: device memory minus the activation reserve minus the weights. A
    hybrid (``layers.ssm``): its own weights, and tokens of its attention layers' K/V (its
    states take their bytes out of the same budget)."""
    hybrid = layers.ssm if layers is not None else None
    weight_bytes = hybrid.weight_bytes if hybrid is not None else model.weight_bytes
    bytes_per_token = kv_bytes_per_token(model, layers)
    if kv_gib is not None:
        if kv_gib <= 0:
            raise ConfigError(f"--kv-gib must be positive, got {kv_gib}")
        return int(kv_gib * GIB) // bytes_per_token
    if cache.kv_capacity_tokens is not None:
        return cache.kv_capacity_tokens
    usable = profile.capacity_bytes * (1.0 - cache.activation_reserve_fraction) - weight_bytes
    if usable <= 0:
        raise ConfigError(
            f"model {model.name} needs {weight_bytes / GIB:.1f} GiB of weights but profile {profile.name} has "
            f"{profile.capacity_bytes / GIB:.1f} GiB ({cache.activation_reserve_fraction:.0%} kept for activations): "
            "no room for KV; use a bigger device or pass --kv-gib")
    return int(usable) // bytes_per_token


@dataclass(frozen=True)
class ReplayResult:
    policy: str
    completed: int
    lost: int
    rejected: int
    makespan_s: float
    generated_tokens: int
    tps: float
    rps: float
    kv_utilization: float
    kv_utilization_all: float
    reservation_efficiency: float
    overflow_rate: float
    preemptions: int
    migrated_bytes: int
    """KV bytes copied (read once and written once each)."""
    swapped_bytes: int
    """KV bytes moved over the host link by preemptions that swapped (out and back in)."""
    num_swaps: int
    """Preemptions that swapped instead of recomputing."""
    kv_read_bytes: int
    runs_per_request: float
    """Mean runs per decode read."""
    num_steps: int
    capacity_tokens: int
    max_concurrent: int = 0
    """Most requests running in one step."""
    held_per_request_bytes: float = 0.0
    """KV memory held (reserved) per running request, mean over steps."""
    backlog_tps: float | None = None
    """Generated tokens / seconds over the steps scheduled with a request left waiting: what
    a server at capacity delivers, without an offline trace's tail, where its last requests
    decode in small batches (``kv_utilization`` asks the same after the step). None: no
    step left one waiting."""
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    tpot_p50_s: float | None = None
    tpot_p99_s: float | None = None
    ttft_mean_s: float | None = None
    tpot_mean_s: float | None = None
    e2e_p50_s: float | None = None
    e2e_p99_s: float | None = None
    extents_free_after: bool = True
    bucket_edges_tokens: tuple[int, ...] = ()
    timeline_s: tuple[float, ...] = field(default=(), repr=False)
    timeline_live_tokens: tuple[int, ...] = field(default=(), repr=False)
    timeline_reserved_tokens: tuple[int, ...] = field(default=(), repr=False)
    policy_extra: dict[str, float] = field(default_factory=dict, hash=False)
    """The policy's own counters at the end (``PolicyStats.extra``; AVMP's migrations, say)."""
    time_split_s: dict[str, float] = field(default_factory=dict, hash=False)
    """Where the steps' emulated time went (``TIME_SPLIT``), summed over the run: the
    step-cost function's own terms, so two policies compare part by part."""

    def metrics(self) -> dict[str, object]:
        """The JSON row: every metric of DESIGN.md, no timelines."""
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("timeline_")}
        d["bucket_edges_tokens"] = list(self.bucket_edges_tokens)
        d["policy_extra"] = dict(self.policy_extra)
        d["time_split_s"] = dict(self.time_split_s)
        d["copied_kv_fraction"] = self.copied_kv_fraction
        return d

    @property
    def copied_kv_fraction(self) -> float:
        """KV bytes copied / KV bytes read by attention."""
        return self.migrated_bytes / self.kv_read_bytes if self.kv_read_bytes else 0.0


TIME_PARTS = ("launch_s", "gather_s", "copy_s", "swap_s", "rest_s")
"""The parts of the steps' time: kernel launches, gather buffers (decode groups and
multi-run prefills), KV and state copies, host swaps (``StepCost``), and the rest: weights,
attention reads of the KV where it lies, compute."""
TIME_SPLIT = ("busy_s",) + TIME_PARTS
"""``ReplayResult.time_split_s``: the time of every step (busy_s; the makespan less idle
waits for arrivals) and its parts (``TIME_PARTS``), which add up to it."""


def _features(r: TraceRequest, max_new_tokens: int) -> RequestFeatures:
    return RequestFeatures(prompt_tokens=r.prompt_tokens, max_new_tokens=max_new_tokens, prompt_text=r.prompt_text,
                           metadata=dict(r.metadata))


class _KVLayout:
    """The KV policy as the engine builds it for ``layers``, and what it holds, in tokens of
    every layer's K/V (a sliding layer holds at most its window of a request's tokens), or
    for a hybrid in tokens of its attention layers' K/V (a request's state at its bytes)."""

    def __init__(self, policy_name: str, model: ModelSpec, layers: LayerKinds | None, capacity_tokens: int,
                 cache: CacheConfig, max_new_tokens: int, drift_detector: object | None,
                 cost: CostModel, state_fraction: float | None) -> None:
        self.layers = layers if layers is not None and layers.num_sliding else None
        self.hybrid = layers.ssm if layers is not None else None
        self.bytes_per_token = kv_bytes_per_token(model, layers)
        self.rings: RingPool | None = None
        self.arena: Any
        self.policy: Any
        if policy_name in HYBRID_BASELINES and self.hybrid is None:
            raise ConfigError(f"policy {policy_name!r} is a scheme for hybrid (SSM) models; {model.name} has no "
                              f"SSM layers")
        if policy_name in HETERO_BASELINES and self.layers is None:
            raise ConfigError(f"policy {policy_name!r} is a baseline for models with sliding-window layers; "
                              f"{model.name} has none")
        if self.hybrid is not None:
            assert state_fraction is not None, "a hybrid needs the tuned split's state share"
            self.policy = make_hybrid_policy(policy_name, self.hybrid, capacity_tokens, cache, max_new_tokens,
                                             state_fraction=state_fraction, drift_detector=drift_detector,
                                             run_cost=cost)
            self.arena = self.policy.arena
            return
        if self.layers is None:
            self.arena = KVArena(model, capacity_tokens, shape_only=True)
            self.policy = make_policy(policy_name, self.arena, cache, max_new_tokens, drift_detector, run_cost=cost)
            return
        kinds = self.layers
        assert kinds.num_layers == model.num_layers and kinds.window_tokens is not None, \
            f"layer kinds of {kinds.num_layers} layers for a model of {model.num_layers}"
        if policy_name in HETERO_BASELINES:  # Jenga / vLLM-hybrid over the same byte budget
            windows = (None,) * kinds.num_full + (kinds.window_tokens,) * kinds.num_sliding
            self.policy = make_hetero_baseline(policy_name, HeteroShape(model, windows),
                                               capacity_tokens * model.kv_bytes_per_token, cache)
            self.arena = self.policy.arena
            return
        if kinds.num_full == 0:
            raise ConfigError(f"{model.name}: every attention layer slides; the engine keeps rings in the full "
                              "layers' arena and has none to keep them in")
        # As LLMEngine: the whole budget in slots of the full layers; rings take their share as rows.
        arena_tokens = capacity_tokens * model.num_layers // kinds.num_full
        self.arena = KVArena(replace(model, num_layers=kinds.num_full), arena_tokens, shape_only=True)
        self.rings = RingPool(self.arena, kinds.num_sliding, kinds.window_tokens)
        inner = make_policy(policy_name, self.arena, cache, max_new_tokens, drift_detector, run_cost=cost)
        self.policy = WindowedPolicy(inner, self.rings)

    def live_tokens(self, running: list[Sequence]) -> int:
        if self.hybrid is not None:  # KV of computed tokens, and one unpadded state per request
            state_bytes = len(running) * self.hybrid.state_bytes_per_request
            return sum(s.kv_tokens for s in running) + state_bytes // self.bytes_per_token
        kinds = self.layers
        if kinds is None:
            return sum(s.kv_tokens for s in running)
        w = kinds.window_tokens
        assert w is not None
        layer_tokens = sum(kinds.num_full * s.kv_tokens + kinds.num_sliding * min(s.kv_tokens, w) for s in running)
        return layer_tokens // kinds.num_layers

    def reserved_tokens(self) -> int:
        states = getattr(self.policy, "states", None)
        if states is not None:  # AvmpPolicy: requests' KV, and the state slots they hold
            return self.policy.reserved_tokens() + states.num_live * states.slot_bytes // self.bytes_per_token
        kinds = self.layers
        if kinds is None or self.rings is None:  # one pool (or a baseline that counts its own)
            return self.policy.reserved_tokens()
        # Requests' runs and rings' rows alike are arena slots of the F full layers.
        return kinds.num_full * self.policy.reserved_tokens() // kinds.num_layers


def replay(trace: Trace, policy_name: str, model: ModelSpec, profile: DeviceProfile, *,
           cache: CacheConfig = CacheConfig(), scheduler_config: SchedulerConfig = SchedulerConfig(),
           max_new_tokens: int, capacity_tokens: int, predictor: LengthPredictor | None = None,
           mode: str = "offline", rate_scale: float = 1.0, timeline_points: int = 400,
           progress: Callable[[int], None] | None = None, drift_detector: object | None = None,
           layers: LayerKinds | None = None, state_fraction: float | None = None) -> ReplayResult:
    """Replay ``trace`` under one KV policy; returns the DESIGN.md metrics. ``layers``: the
    model's layer kinds (None: every layer full attention). ``state_fraction``: for a hybrid,
    the tuned split's state share (``avmp``, ``static_split_tuned``); None: tuned on ``trace``
    (``tuned_state_fraction``)."""
    if mode not in ("offline", "online"):
        raise ConfigError(f"mode must be offline or online, not {mode!r}")
    if rate_scale <= 0:
        raise ConfigError(f"--rate-scale must be positive, got {rate_scale}")
    cost = CostModel(profile, model, layers=layers)
    views = cost.view_rule()
    if layers is not None and layers.ssm is not None and state_fraction is None:
        state_fraction = tuned_state_fraction(layers.ssm, trace)
    kv = _KVLayout(policy_name, model, layers, capacity_tokens, cache, max_new_tokens, drift_detector, cost,
                   state_fraction)
    arena, policy = kv.arena, kv.policy
    # As LLMEngine: preempted requests swap to host memory where the policy is ``swappable``;
    # the replay only counts the bytes.
    scheduler = Scheduler(policy, scheduler_config, model.max_position_embeddings, predictor,
                          swap_capacity_tokens=cost.swap_capacity_tokens(cache.swap_space_bytes))

    # Requests, predictions (made once, before they run: what a server would know).
    requests = list(trace.requests)
    feats = [_features(r, max_new_tokens) for r in requests]
    seqs: list[Sequence] = []
    for r, f in zip(requests, feats):
        out = max(1, min(r.output_tokens, max_new_tokens))
        seqs.append(Sequence(request_id=r.request_id, prompt_tokens=r.prompt_tokens, max_new_tokens=max_new_tokens,
                             arrival_s=(r.arrival_s / rate_scale) if mode == "online" else 0.0, features=f,
                             true_output_tokens=out))
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].arrival_s)
    next_arrival = 0
    rejected = 0
    now_s = 0.0
    util_sat: list[float] = []
    util_all: list[float] = []
    live_sum = 0
    reserved_sum = 0
    tl_t: list[float] = []
    tl_live: list[int] = []
    tl_res: list[int] = []
    generated = 0
    steps = 0
    backlog_tokens, backlog_s = 0, 0.0
    kv_read_bytes = 0
    swapped_bytes = 0
    num_reads = 0
    num_read_runs = 0
    max_running = 0
    held_per_request_sum = 0.0
    split = dict.fromkeys(TIME_SPLIT, 0.0)
    kv_bytes_per_token = kv.bytes_per_token

    def admit_arrivals() -> None:
        nonlocal next_arrival, rejected
        while next_arrival < len(order) and seqs[order[next_arrival]].arrival_s <= now_s:
            seq = seqs[order[next_arrival]]
            next_arrival += 1
            try:
                scheduler.add(seq)
            except RequestRejected:
                rejected += 1
                seq.finish_reason = "rejected"

    while True:
        admit_arrivals()
        if not scheduler.has_work:
            if next_arrival >= len(order):
                break
            now_s = max(now_s, seqs[order[next_arrival]].arrival_s)
            continue
        batch = scheduler.schedule()
        if batch.is_empty:
            # Nothing can run: only possible if a single request exceeds every region.
            raise AssertionError(f"{policy_name}: scheduler made no progress with {len(scheduler.waiting)} waiting")
        work = describe_step(batch, policy, views)
        max_running = max(max_running, len(scheduler.running))
        held_per_request_sum += kv.reserved_tokens() * kv_bytes_per_token / len(scheduler.running)
        step = cost.step_time(work)
        now_s += step.time_s
        sampled = batch.sampled
        if scheduler.waiting:  # the batch left someone waiting: the server is at capacity
            backlog_tokens += len(sampled)
            backlog_s += step.time_s
        steps += 1
        split["busy_s"] += step.time_s
        split["launch_s"] += step.overhead_s
        split["gather_s"] += step.gather_s
        split["copy_s"] += step.copy_s
        split["swap_s"] += step.swap_s
        kv_read_bytes += step.kv_read_bytes
        swapped_bytes += step.swap_bytes
        num_reads += work.num_decodes
        num_read_runs += sum(len(r) for r in work.decode_read_runs)
        finished: list[Sequence] = []
        for s in sampled:
            s.num_generated += 1
            generated += 1
            if s.first_token_s is None:
                s.first_token_s = now_s
            assert s.true_output_tokens is not None
            if s.num_generated >= s.true_output_tokens:
                s.finish_s = now_s
                s.finish_reason = "length"
                finished.append(s)
        scheduler.postprocess(batch, finished)
        live = kv.live_tokens(scheduler.running)
        reserved = kv.reserved_tokens()
        frac = live / capacity_tokens
        util_all.append(frac)
        if scheduler.waiting:
            util_sat.append(frac)
        live_sum += live
        reserved_sum += reserved
        tl_t.append(now_s)
        tl_live.append(live)
        tl_res.append(reserved)
        if progress is not None and finished:
            progress(len(finished))

    policy.check_integrity()
    done = [s for s in seqs if s.finish_s is not None]
    lost = len(seqs) - len(done) - rejected
    makespan = now_s if now_s > 0 else float("nan")
    result_kwargs: dict[str, object] = {}
    if mode == "online" and done:
        ttft = np.array([s.first_token_s - s.arrival_s for s in done])
        tpot = np.array([(s.finish_s - s.first_token_s) / (s.num_generated - 1) for s in done if s.num_generated > 1])
        e2e = np.array([s.finish_s - s.arrival_s for s in done])
        result_kwargs = {"ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
                         "tpot_p50_s": float(np.percentile(tpot, 50)) if tpot.size else None,
                         "tpot_p99_s": float(np.percentile(tpot, 99)) if tpot.size else None,
                         "ttft_mean_s": float(ttft.mean()), "tpot_mean_s": float(tpot.mean()) if tpot.size else None,
                         "e2e_p50_s": float(np.percentile(e2e, 50)), "e2e_p99_s": float(np.percentile(e2e, 99))}
    keep = np.unique(np.linspace(0, len(tl_t) - 1, min(timeline_points, len(tl_t))).astype(int)) if tl_t else []
    stats = policy.stats()
    split["rest_s"] = split["busy_s"] - sum(split[k] for k in TIME_PARTS if k != "rest_s")
    return ReplayResult(
        policy=policy_name, completed=len(done), lost=lost, rejected=rejected, makespan_s=makespan, generated_tokens=generated,
        tps=generated / makespan, rps=len(done) / makespan,
        kv_utilization=float(np.mean(util_sat)) if util_sat else float(np.mean(util_all)),
        kv_utilization_all=float(np.mean(util_all)),
        reservation_efficiency=live_sum / reserved_sum if reserved_sum else 0.0,
        overflow_rate=policy.overflowed_requests / max(1, len(done)), preemptions=scheduler.num_preemptions,
        migrated_bytes=arena.moved_bytes, swapped_bytes=swapped_bytes, num_swaps=scheduler.num_swaps,
        kv_read_bytes=kv_read_bytes,
        runs_per_request=num_read_runs / num_reads if num_reads else 1.0, num_steps=steps,
        capacity_tokens=capacity_tokens, max_concurrent=max_running,
        held_per_request_bytes=held_per_request_sum / steps if steps else 0.0,
        backlog_tps=backlog_tokens / backlog_s if backlog_s > 0 else None,
        extents_free_after=policy.reserved_tokens() == 0 and policy.num_live() == 0,
        bucket_edges_tokens=stats.bucket_edges_tokens,
        timeline_s=tuple(tl_t[i] for i in keep), timeline_live_tokens=tuple(tl_live[i] for i in keep),
        timeline_reserved_tokens=tuple(tl_res[i] for i in keep), policy_extra=dict(stats.extra),
        time_split_s=split, **result_kwargs,  # type: ignore[arg-type]
    )
