"""Shape-only replay of a model with sliding-window layers under five KV memory schemes.

::

    trace (prompt, output tokens) -> continuous batching (FCFS; preempt the newest by
        recompute; no admission in a step that preempted) -> memory scheme
        (emulator/hetero_memory.py, emulator/hetero_paged.py; one byte budget, one watermark)
        -> every step priced by the one step-cost function (emulator/cost_model.py) with
           the shape's layer kinds: full layers over their read runs, sliding layers over
           the runs of their window (``StepWork.decode_sliding_runs``)

Traces: ShareGPT-like (ShareGPT pairs, tokens = characters / 4) and Alpaca-like (Vicuna-7B
output lengths of Alpaca prompts, prompt tokens = characters / 4). Every request arrives at
t = 0 (offline throughput). ``held_per_request_bytes``: mean over steps of bytes held /
running requests; ``waste_while_waiting``: mean over steps with a waiting request of the
budget share held but not live (page tails, padding layers, stranded small pages, claimed
room); ``unused_while_waiting``: 1 - live / budget over those steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from emulator.cost_model import CostModel
from emulator.hetero_memory import HeteroMemory, HeteroShape, OdmaEngineRings, OdmaRings
from emulator.hetero_paged import JengaLCM, VllmHybrid
from emulator.profile import DeviceProfile
from emulator.shape_scheduler import ShapeSeq as _Seq, schedule_shape_step
from emulator.traces import default_shared_dir
from odma_mlu.config import BUILTIN_MODEL_SHAPES, CacheConfig, load_model_spec
from odma_mlu.engine.step_work import StepWork
from odma_mlu.kvcache.window import RING_BLOCK_TOKENS
from odma_mlu.models.layer_types import layer_windows
from odma_mlu.predictor.base import RequestFeatures
from odma_mlu.predictor.simple import SimplePredictor

SHAREGPT_DEV = default_shared_dir() / "sharegpt" / "sharegpt_pairs_dev.jsonl"
ALPACA = default_shared_dir() / "lengths" / "alpaca_vicuna7b_train.jsonl"
CHARS_PER_TOKEN = 4
MEMORY_USE_FRACTION = 0.90


def load_shape(name_or_path: str) -> HeteroShape:
    """A built-in shape (odma_mlu/models/shapes) or config.json, with its per-layer windows."""
    from importlib import resources

    spec = load_model_spec(name_or_path)
    if name_or_path in BUILTIN_MODEL_SHAPES:
        text = resources.files("odma_mlu.models").joinpath("shapes").joinpath(
            BUILTIN_MODEL_SHAPES[name_or_path]).read_text()
    else:
        path = Path(name_or_path)
        text = (path / "config.json" if path.is_dir() else path).read_text()
    windows = layer_windows(json.loads(text), name_or_path)
    if all(w is None for w in windows) or all(w is not None for w in windows):
        raise ValueError(f"{name_or_path}: needs both full and sliding-window layers for this replay")
    return HeteroShape(spec, windows)


def sharegpt_trace(path: Path = SHAREGPT_DEV, max_requests: int | None = None,
                   max_prompt_tokens: int = 4096) -> list[tuple[int, int]]:
    out = []
    with path.open() as f:
        for line in f:
            d = json.loads(line)
            out.append((min(max_prompt_tokens, max(1, len(d["prompt"]) // CHARS_PER_TOKEN)),
                        max(1, len(d["response"]) // CHARS_PER_TOKEN)))
            if max_requests is not None and len(out) >= max_requests:
                break
    return out


def alpaca_trace(path: Path = ALPACA, max_requests: int | None = None) -> list[tuple[int, int]]:
    out = []
    with path.open() as f:
        for line in f:
            d = json.loads(line)
            out.append((max(1, len(d["prompt"]) // CHARS_PER_TOKEN), max(1, int(d["output_tokens"]))))
            if max_requests is not None and len(out) >= max_requests:
                break
    return out


def step_cost(profile: DeviceProfile, shape: HeteroShape) -> CostModel:
    """The one step-cost function for ``shape``: its spec and its layer kinds (full + sliding)."""
    return CostModel(profile, shape.spec, layers=shape.kinds)


@dataclass
class HeteroResult:
    scheme: str
    model: str
    trace: str
    budget_bytes: int
    completed: int = 0
    generated_tokens: int = 0
    makespan_s: float = 0.0
    tps: float = 0.0
    max_concurrent: int = 0
    mean_concurrent: float = 0.0
    held_per_request_bytes: float = 0.0
    live_per_request_bytes: float = 0.0
    waste_while_waiting: float = 0.0
    unused_while_waiting: float = 0.0
    preemptions: int = 0
    copied_tokens: int = 0
    sliding_runs_per_read: float = 0.0


def replay(trace: list[tuple[int, int]], memory: HeteroMemory, cost: CostModel, trace_name: str,
           max_new_tokens: int, max_num_seqs: int = 1024, max_batched_tokens: int = 8192,
           check_every: int = 0) -> HeteroResult:
    res = HeteroResult(memory.name, memory.shape.spec.name, trace_name, memory.budget_bytes)
    predictor = SimplePredictor()
    waiting = [_Seq(f"r{i}", p, min(o, max_new_tokens)) for i, (p, o) in enumerate(trace)]
    waiting.reverse()  # a stack: the head of the queue is waiting[-1]
    running: list[_Seq] = []
    feats: dict[str, RequestFeatures] = {}
    clock_s = 0.0
    steps = waited = 0
    conc = held_sum = live_sum = waste_sum = unused_sum = 0.0
    runs_sum = runs_n = 0

    def admit(seq: _Seq) -> bool:
        f = feats.setdefault(seq.rid, RequestFeatures(seq.prompt, max_new_tokens))
        return memory.admit(seq.rid, seq.tokens, seq.prompt, max_new_tokens, predictor.predict(f))

    while waiting or running:
        step = schedule_shape_step(running, waiting, memory.grow, lambda victim: memory.release(victim.rid, None),
                                   admit, max_num_seqs, max_batched_tokens)
        prefill, decode = step.prefill, step.decode
        res.preemptions += step.preemptions
        if not prefill and not decode:
            raise StalledScheme(f"{memory.name}: no progress with {len(waiting)} waiting and an empty device (a "
                                "request needs more than this scheme can ever give it)")
        held, live = memory.held_bytes(), memory.live_bytes()
        held_sum += held / len(running)
        live_sum += live / len(running)
        if waiting:
            waste_sum += (held - live) / memory.budget_bytes
            unused_sum += 1.0 - live / memory.budget_bytes
            waited += 1
        reads = [memory.read_runs(s.rid, s.tokens) for s in decode]
        runs_sum += sum(len(r[1]) for r in reads)
        runs_n += len(reads)
        copies, memory.pending_copy_tokens = memory.pending_copy_tokens, []
        res.copied_tokens += sum(copies)
        work = StepWork.build([s.tokens for s in prefill], [r[0] for r in reads], copies,
                              sliding_read_runs=[r[1] for r in reads])
        clock_s += cost.step_time(work).time_s
        steps += 1
        conc += len(running)
        res.max_concurrent = max(res.max_concurrent, len(running))
        for seq in prefill + decode:
            seq.generated += 1
            res.generated_tokens += 1
            if seq.generated >= seq.output:
                memory.release(seq.rid, seq.generated)
                predictor.observe(feats[seq.rid], seq.generated)
                running.remove(seq)
                res.completed += 1
        if check_every and steps % check_every == 0:
            memory.check_integrity()
    memory.check_integrity()
    assert memory.held_bytes() == 0, f"{memory.name}: {memory.held_bytes()} bytes held after the trace"
    res.makespan_s = clock_s
    res.tps = res.generated_tokens / clock_s if clock_s else 0.0
    res.mean_concurrent = conc / steps
    res.held_per_request_bytes = held_sum / steps
    res.live_per_request_bytes = live_sum / steps
    res.waste_while_waiting = waste_sum / waited if waited else 0.0
    res.unused_while_waiting = unused_sum / waited if waited else 0.0
    res.sliding_runs_per_read = runs_sum / runs_n if runs_n else 0.0
    return res


class StalledScheme(RuntimeError):
    """A memory scheme that can never admit the next request (e.g. a static split whose
    full-attention share is smaller than one request): the bench reports it, not a result."""


def schemes(shape: HeteroShape, budget: int, profile: DeviceProfile, max_new_tokens: int,
            trace: list[tuple[int, int]], cache: CacheConfig = CacheConfig(),
            ring_block_tokens: int = RING_BLOCK_TOKENS) -> dict[str, Callable[[], HeteroMemory]]:
    """The schemes compared, by label (``trace``: the replayed one; no scheme sizes by it now;
    ``ring_block_tokens``: B of the engine's ring layout, odma_engine_rings)."""
    run_cost = step_cost(profile, shape)  # ODMA's copy decision: runs and copies of the full layers
    wm = cache.watermark_fraction
    return {
        "odma_rings": lambda: OdmaRings(shape, budget, cache, max_new_tokens, run_cost),
        "odma_engine_rings": lambda: OdmaEngineRings(shape, budget, cache, max_new_tokens, run_cost,
                                                     ring_block_tokens),
        "jenga": lambda: JengaLCM(shape, budget, wm),
        "vllm_hybrid": lambda: VllmHybrid(shape, budget, wm),
        "vllm_uniform": lambda: VllmHybrid(shape, budget, wm, uniform=True),
    }


def cache_budget_bytes(profile: DeviceProfile, shape: HeteroShape) -> int:
    budget = int(profile.capacity_bytes * MEMORY_USE_FRACTION) - shape.spec.weight_bytes
    if budget <= 0:
        raise ValueError(f"{shape.spec.name}: weights {shape.spec.weight_bytes / 2**30:.1f} GiB leave no KV memory on "
                         f"{profile.name}; pass --kv-gib")
    return budget


COLUMNS = ("model", "trace", "scheme", "completed", "tps", "max_concurrent", "mean_concurrent",
           "held_per_request_mib", "live_per_request_mib", "waste_while_waiting", "unused_while_waiting",
           "preemptions", "copied_tokens", "sliding_runs_per_read")


def format_table(results: list[HeteroResult]) -> str:
    rows = [COLUMNS]
    for r in results:
        d = asdict(r)
        d["held_per_request_mib"] = r.held_per_request_bytes / 2**20
        d["live_per_request_mib"] = r.live_per_request_bytes / 2**20
        rows.append(tuple(f"{d[c]:.1f}" if c in ("tps", "held_per_request_mib", "live_per_request_mib",
                                                 "mean_concurrent") else
                          f"{d[c]:.3f}" if isinstance(d[c], float) else str(d[c]) for c in COLUMNS))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
