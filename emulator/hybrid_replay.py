"""Shape-only replay of a hybrid SSM + attention model under three memory schemes.

::

    trace (prompt, output tokens) -> continuous batching (FCFS, preempt newest by recompute)
        -> memory scheme: static split | AVMP (migrate on failure) | padded unified (vLLM)
        -> the one step-cost function (emulator/cost_model.py: CostModel.step_time) prices
           every step with the hybrid's layer kinds (attention + SSM) on the device profile
        -> HybridResult: waste, concurrency, tps, OOM events, preemptions, migrations

Traces come from ShareGPT pairs (tokens = characters / 4): ``sharegpt`` as recorded, and
``drifting`` (AVMP's drift case): the first half keeps ShareGPT's short prompts, the second
half's prompts carry a conversation history (the previous ``history_pairs`` prompts and
responses), so the mix moves from state-bound (many short requests) to KV-bound.

Every request arrives at t=0 (offline); FCFS order carries the drift. Capacity numbers:
``capacity_wasted`` is the mean, over steps where a request was waiting, of the budget
share not holding live data (KV of real tokens + one unpadded state per request);
``held_not_live`` is the part of it allocated to requests but not live (page tails,
padding); the rest was free but of no use to the waiting request (stranded in the wrong
pool, or too little).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from emulator.cost_model import CostModel
from emulator.hybrid_pools import DualPools, HybridMemory, PaddedUnified
from emulator.profile import DeviceProfile
from emulator.shape_scheduler import ShapeSeq as _Seq, schedule_shape_step
from emulator.traces import default_shared_dir
from odma_mlu.engine.step_work import StepWork
from odma_mlu.models.hybrid_spec import HybridSpec
from odma_mlu.models.layer_kinds import LayerKinds

SHAREGPT_DEV = default_shared_dir() / "sharegpt" / "sharegpt_pairs_dev.jsonl"
CHARS_PER_TOKEN = 4
MEMORY_USE_FRACTION = 0.90  # as FACTS.md's KV estimate for the 7B on one card


@dataclass(frozen=True)
class TraceRequest:
    prompt_tokens: int
    output_tokens: int


def load_pairs(path: Path = SHAREGPT_DEV, max_requests: int | None = None) -> list[tuple[int, int]]:
    """(prompt, response) token counts of a ShareGPT pairs JSONL (characters / 4, at least 1)."""
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT pairs file {path} not found; pass --data PATH to a *_pairs_*.jsonl")
    out = []
    with path.open() as f:
        for line in f:
            d = json.loads(line)
            out.append((max(1, len(d["prompt"]) // CHARS_PER_TOKEN), max(1, len(d["response"]) // CHARS_PER_TOKEN)))
            if max_requests is not None and len(out) >= max_requests:
                break
    return out


def sharegpt_trace(pairs: list[tuple[int, int]], max_prompt_tokens: int = 4096) -> list[TraceRequest]:
    return [TraceRequest(min(p, max_prompt_tokens), r) for p, r in pairs]


def drifting_trace(pairs: list[tuple[int, int]], history_pairs: int = 8,
                   max_prompt_tokens: int = 8192) -> list[TraceRequest]:
    """Short prompts first, then long ones (each prompt + the previous pairs as history)."""
    half = len(pairs) // 2
    out = [TraceRequest(p, r) for p, r in pairs[:half]]
    for i in range(half, len(pairs)):
        history = sum(p + r for p, r in pairs[max(0, i - history_pairs):i])
        out.append(TraceRequest(min(max_prompt_tokens, pairs[i][0] + history), pairs[i][1]))
    return out


def cache_budget_bytes(profile: DeviceProfile, hybrid: HybridSpec) -> int:
    """Device memory for KV + states: MEMORY_USE_FRACTION of capacity minus the weights."""
    weights = hybrid.num_params * hybrid.base.dtype_bytes
    budget = int(profile.capacity_bytes * MEMORY_USE_FRACTION) - weights
    if budget <= 0:
        raise ValueError(f"{hybrid.base.name}: weights {weights / 2**30:.1f} GiB leave no cache memory on "
                         f"{profile.name} ({profile.capacity_bytes / 2**30:.1f} GiB); pass a cache budget explicitly")
    return budget


def tuned_state_fraction(hybrid: HybridSpec, trace: list[TraceRequest]) -> float:
    """The static split a careful operator would pick from the trace's mean request: the
    state's share of a request's memory at half its output (mean live length)."""
    mean_tokens = sum(r.prompt_tokens + r.output_tokens / 2 for r in trace) / len(trace)
    state = hybrid.state_bytes_per_request
    return state / (state + mean_tokens * hybrid.kv_bytes_per_token)


@dataclass
class HybridResult:
    scheme: str
    model: str
    trace: str
    budget_bytes: int
    completed: int = 0
    lost: int = 0
    makespan_s: float = 0.0
    generated_tokens: int = 0
    tps: float = 0.0
    rps: float = 0.0
    preemptions: int = 0
    oom_events: int = 0
    migrations: int = 0
    migrated_bytes: int = 0
    max_concurrent: int = 0
    mean_concurrent: float = 0.0
    capacity_wasted: float = 0.0
    held_not_live: float = 0.0
    stranded: float = 0.0
    kv_run_tokens: int = 0
    notes: dict[str, float] = field(default_factory=dict)


def step_cost(profile: DeviceProfile, hybrid: HybridSpec) -> CostModel:
    """The one step-cost function for ``hybrid``: its base shape and its layer kinds."""
    return CostModel(profile, hybrid.base, layers=LayerKinds.from_hybrid(hybrid))


def replay(trace: list[TraceRequest], memory: HybridMemory, cost: CostModel, trace_name: str,
           max_num_seqs: int = 1024, max_batched_tokens: int = 8192, check_every: int = 0) -> HybridResult:
    """Run ``trace`` to completion under ``memory``; every step priced by ``cost``."""
    res = HybridResult(memory.name, memory.hybrid.base.name, trace_name, memory.budget_bytes,
                       kv_run_tokens=memory.kv_run_tokens)
    waiting = [_Seq(f"r{i}", r.prompt_tokens, r.output_tokens) for i, r in enumerate(trace)]
    waiting.reverse()  # a stack: the head of the queue is waiting[-1]
    running: list[_Seq] = []
    clock_s = 0.0
    steps = waited_steps = 0
    conc_sum = 0
    waste_sum = held_sum = 0.0
    while waiting or running:
        step = schedule_shape_step(running, waiting, memory.grow, lambda victim: memory.release(victim.rid),
                                   lambda seq: memory.admit(seq.rid, seq.tokens), max_num_seqs, max_batched_tokens)
        prefill, decode = step.prefill, step.decode
        res.preemptions += step.preemptions
        if not prefill and not decode:
            if waiting and not running:  # cannot run even on an empty device: it never will
                res.lost += 1
                waiting.pop()
            continue
        # Account this step's memory before tokens advance.
        if waiting:
            live, held = memory.live_bytes(), memory.held_bytes()
            waste_sum += 1.0 - live / memory.budget_bytes
            held_sum += (held - live) / memory.budget_bytes
            waited_steps += 1
        copy_tokens, state_copy_bytes = memory.take_copies()
        work = StepWork.build([s.tokens for s in prefill], [memory.read_runs(s.rid, s.tokens) for s in decode],
                              copy_tokens, state_copy_bytes=state_copy_bytes)
        clock_s += cost.step_time(work).time_s
        steps += 1
        conc_sum += len(running)
        res.max_concurrent = max(res.max_concurrent, len(running))
        for seq in prefill + decode:
            seq.generated += 1
            res.generated_tokens += 1
            if seq.generated >= seq.output:
                memory.release(seq.rid)
                running.remove(seq)
                res.completed += 1
        if check_every and steps % check_every == 0:
            memory.check_integrity()
    memory.check_integrity()
    c = memory.counters
    res.makespan_s = clock_s
    res.tps = res.generated_tokens / clock_s if clock_s else 0.0
    res.rps = res.completed / clock_s if clock_s else 0.0
    res.oom_events, res.migrations, res.migrated_bytes = c.oom_events, c.migrations, c.copied_bytes
    res.mean_concurrent = conc_sum / steps if steps else 0.0
    res.capacity_wasted = waste_sum / waited_steps if waited_steps else 0.0
    res.held_not_live = held_sum / waited_steps if waited_steps else 0.0
    res.stranded = res.capacity_wasted - res.held_not_live
    if isinstance(memory, PaddedUnified):
        res.notes = {"block_tokens": float(memory.block_tokens), "state_padding_ratio": memory.padding_ratio()}
    return res


def schemes(hybrid: HybridSpec, budget_bytes: int, tuned_fraction: float) -> dict[str, Callable[[], HybridMemory]]:
    """The compared schemes, each a fresh memory per run."""
    return {
        "padded_unified": lambda: PaddedUnified(hybrid, budget_bytes),
        "static_split_0.5": lambda: DualPools(hybrid, budget_bytes, 0.5, migrate=False),
        f"static_split_tuned({tuned_fraction:.2f})": lambda: DualPools(hybrid, budget_bytes, tuned_fraction,
                                                                      migrate=False),
        "avmp": lambda: DualPools(hybrid, budget_bytes, tuned_fraction, migrate=True),
    }


def run_all(hybrids: list[HybridSpec], profile: DeviceProfile, traces: dict[str, list[TraceRequest]],
            budget_bytes: int | None = None, max_num_seqs: int = 1024) -> list[HybridResult]:
    out = []
    for hybrid in hybrids:
        budget = budget_bytes if budget_bytes is not None else cache_budget_bytes(profile, hybrid)
        cost = step_cost(profile, hybrid)
        tuned = tuned_state_fraction(hybrid, traces["sharegpt"]) if "sharegpt" in traces \
            else tuned_state_fraction(hybrid, next(iter(traces.values())))
        for trace_name, trace in traces.items():
            for label, make in schemes(hybrid, budget, tuned).items():
                r = replay(trace, make(), cost, trace_name, max_num_seqs=max_num_seqs)
                r.scheme = label
                out.append(r)
    return out


COLUMNS = ("model", "trace", "scheme", "completed", "lost", "tps", "max_concurrent", "mean_concurrent",
           "capacity_wasted", "held_not_live", "stranded", "preemptions", "oom_events", "migrations",
           "migrated_bytes", "makespan_s")


def format_table(results: list[HybridResult]) -> str:
    rows = [COLUMNS]
    for r in results:
        d = asdict(r)
        rows.append(tuple(f"{d[c]:.3f}" if isinstance(d[c], float) and c != "tps" else
                          (f"{d[c]:.1f}" if c == "tps" else str(d[c])) for c in COLUMNS))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def write_json(results: list[HybridResult], path: Path, profile: DeviceProfile) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"profile": profile.name, "results": [asdict(r) for r in results]}, indent=1))
