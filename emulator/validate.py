"""``odma-mlu validate-emulator``: real step times next to THE step-cost function, with a
fixed held-out split and a verdict that can fail.

Every case builds its KV layout directly (``KVLocation`` runs; no policy), times the real
forward (or ``KVArena.copy_run``) on the backend, and prices the same work with
``CostModel.step_time(StepWork)`` (``CostModel.copy_s`` for copies), the StepWork built as
``describe_step`` would (``StepWork.build``: each decode's ``location.run_tokens(total)``,
groups by ``decode_group_key``, a lone one-run sequence read as a view)::

    kind            layout                                            grid (batch x context)
    decode_one_run  one run per sequence, uneven starts (random gaps)  {1, 4, 16} x {64, 256, 1024}
    decode_runs     4 runs of uneven lengths per sequence, scattered   {1, 4, 16} x {256, 1024}
    decode_paged    16-token page runs at random pages (adjacent merge) {1, 4, 16} x {256, 1024}
    decode_views    decode_one_run's layout, at the cost model's view {1, 4, 16} x {256, 1024}
                    length: each sequence that long read alone, in place (a group of its own)
    decode_split    decode_runs' layout, at the cost model's view length: {1, 4, 16} x {256, 1024}
                    runs that long are read in parts (``ViewRule.split_gain``)
    prefill         a whole prompt per sequence, one run               {1, 4} x {64, 256}, 1 x 1024
    kv_copy         ``batch`` copy_run calls of ``context`` tokens     {1, 8} x {16, 256, 4096}

The split is fixed here, not chosen after looking: in each kind's grid, case (i, j)
(i-th batch, j-th context) is held out when i + j is odd (a checkerboard), so every kind
has held-out cases at small and large sizes. Only the other cases may be used to shape the
cost model or the profile; the verdict is over held-out cases only: PASS when their median
|predicted - measured| / measured is at most ``--max-error`` (default 0.25), else FAIL and
exit code 1.

Timing: every case is set up once, then timed ``repeats`` times round-robin over the cases
(one run of each case per round) after a warm-up round, so a burst of load from another
process spreads over all cases instead of bending one; each case reports the median.

The profile must describe the device timed: a measured profile whose
``provenance.backend`` is the backend (a derived MLU/GPU profile on the CPU backend is a
usage error, exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from emulator.cost_model import CostModel
from emulator.profile import DeviceProfile, load_profile
from odma_mlu.engine.step_work import StepWork
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.arena import KVLocation

KINDS = ("decode_one_run", "decode_runs", "decode_paged", "decode_views", "decode_split", "prefill", "kv_copy")
GRIDS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "decode_one_run": ((1, 4, 16), (64, 256, 1024)),
    "decode_runs": ((1, 4, 16), (256, 1024)),
    "decode_paged": ((1, 4, 16), (256, 1024)),
    "decode_views": ((1, 4, 16), (256, 1024)),
    "decode_split": ((1, 4, 16), (256, 1024)),
    "prefill": ((1, 4), (64, 256)),
    "kv_copy": ((1, 8), (16, 256, 4096)),
}
EXTRA_CASES: dict[str, tuple[tuple[int, int, bool], ...]] = {
    "prefill": ((1, 1024, True),),  # (batch, context, held_out): one long prompt, held out
}
RUNS_PER_SEQUENCE = 4
PAGE_TOKENS = 16
DEFAULT_REPEATS = 9
DEFAULT_MAX_ERROR = 0.25


@dataclass
class Case:
    kind: str
    batch: int
    context_tokens: int
    held_out: bool
    predicted_s: float = 0.0
    runs: float = 1.0
    """Mean runs read per sequence (decode kinds)."""
    split_reads: int = 0
    """Decodes read in parts (``StepWork.decode_split_parts``)."""
    views: int = 0
    """Decode groups read in place, as a view (``StepWork.decode_group_views``)."""
    run: Callable[[], None] | None = field(default=None, repr=False)
    times: list[float] = field(default_factory=list, repr=False)
    cpu_times: list[float] = field(default_factory=list, repr=False)


def case_grid() -> list[tuple[str, int, int, bool]]:
    """Every (kind, batch, context, held_out), in a fixed order; the split is fixed here."""
    out: list[tuple[str, int, int, bool]] = []
    for kind in KINDS:
        batches, contexts = GRIDS[kind]
        for i, b in enumerate(batches):
            for j, c in enumerate(contexts):
                out.append((kind, b, c, (i + j) % 2 == 1))
        out.extend((kind, b, c, h) for b, c, h in EXTRA_CASES.get(kind, ()))
    return out


def profile_device_kind(profile: DeviceProfile) -> str:
    """The kind of device a profile describes: cpu, cuda or mlu ('' when unknown).

    A measured profile records ``provenance.backend``; a derived one is named after its
    card (mlu370-x4, h100-sxm)."""
    prov = profile.provenance or {}
    if prov.get("backend"):
        return str(prov["backend"])
    name = profile.name.lower()
    for prefix, kind in (("mlu", "mlu"), ("h100", "cuda"), ("a100", "cuda"), ("cuda", "cuda"), ("cpu", "cpu")):
        if name.startswith(prefix):
            return kind
    return ""


def check_profile_for_backend(profile: DeviceProfile, backend_name: str) -> None:
    """Refuse a profile that does not describe the device being timed (ConfigError, exit 2)."""
    kind = profile_device_kind(profile)
    measured = (profile.provenance or {}).get("kind") == "measured"
    if kind != backend_name or not measured:
        what = f"{'measured' if measured else 'derived'} for {kind or 'an unknown device'}"
        raise ConfigError(f"profile {profile.name!r} ({profile.source_path}) is {what}, but validate-emulator times "
                          f"the {backend_name} backend: measure this device with `odma-mlu profile-bandwidth "
                          f"--backend {backend_name}` and pass that profile")


def _merge(runs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Adjacent runs merged, as a policy's location would hold them."""
    out: list[tuple[int, int]] = []
    for s, n in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return tuple(out)


def decode_locations(kind: str, batch: int, total: int, rng: Any) -> tuple[list[KVLocation], int]:
    """``batch`` locations holding ``total`` tokens each in the layout of ``kind``, and the
    arena size they need. Starts are uneven (random gaps); runs and pages are scattered."""
    if kind in ("decode_one_run", "decode_views"):
        locs, cursor = [], 0
        for _ in range(batch):
            cursor += int(rng.integers(1, 64))  # uneven start, never aligned to the previous end
            locs.append(KVLocation(((cursor, total),)))
            cursor += total
        return locs, cursor + 1
    if kind in ("decode_runs", "decode_split"):
        # RUNS_PER_SEQUENCE runs of uneven lengths (Dirichlet shares, at least 1 token each),
        # all runs of all sequences placed in a shuffled order with random gaps.
        pieces: list[tuple[int, int, int]] = []  # (sequence, index, tokens)
        for s in range(batch):
            shares = rng.dirichlet([1.0] * RUNS_PER_SEQUENCE)
            lens = [max(1, int(round(x * total))) for x in shares[:-1]]
            lens.append(total - sum(lens))
            while lens[-1] < 1:  # rounding overshoot: take it back from the longest run
                k = max(range(len(lens) - 1), key=lambda i: lens[i])
                lens[k] -= 1
                lens[-1] += 1
            pieces.extend((s, i, n) for i, n in enumerate(lens))
        order = rng.permutation(len(pieces))
        starts: dict[tuple[int, int], int] = {}
        cursor = 0
        for k in order:
            s, i, n = pieces[k]
            cursor += int(rng.integers(1, 64))
            starts[(s, i)] = cursor
            cursor += n
        locs = []
        for s in range(batch):
            runs = [(starts[(s, i)], n) for (ss, i, n) in pieces if ss == s]
            locs.append(KVLocation(_merge(runs)))
        return locs, cursor + 1
    if kind == "decode_paged":
        pages_each = -(-total // PAGE_TOKENS)
        pool = 2 * batch * pages_each  # half the pages free, as in a busy paged cache
        perm = rng.permutation(pool)
        locs = []
        for s in range(batch):
            ids = perm[s * pages_each:(s + 1) * pages_each]
            runs = [(int(p) * PAGE_TOKENS, min(PAGE_TOKENS, total - k * PAGE_TOKENS)) for k, p in enumerate(ids)]
            locs.append(KVLocation(_merge(runs)))
        return locs, pool * PAGE_TOKENS
    raise ValueError(kind)


def build_cases(model: Any, spec: Any, cost: CostModel, seed: int = 0) -> list[Case]:
    """Set up every case of ``case_grid`` that fits the model (KV filled with random values)."""
    import numpy as np
    import torch

    from odma_mlu.models.attention import ForwardBatch, SequenceInput

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    cases: list[Case] = []
    for kind, batch, ctx, held in case_grid():
        case = Case(kind, batch, ctx, held)
        if kind == "kv_copy":
            arena = model.new_arena(2 * batch * ctx + 64)
            # Sources first, targets after them (no overlap), starts shifted by an odd offset.
            pairs = [(i * ctx, batch * ctx + 31 + i * ctx) for i in range(batch)]

            def run(arena=arena, pairs=pairs, n=ctx) -> None:
                for src, dst in pairs:
                    arena.copy_run(src, dst, n)
                arena.take_issued_copies()

            case.run = run
            case.predicted_s = sum(cost.copy_s(ctx, i) for i in range(batch))  # one batch
            cases.append(case)
            continue
        if ctx + 1 > spec.max_position_embeddings:
            print(f"skip {kind} batch {batch} context {ctx}: past the model's {spec.max_position_embeddings} "
                  "positions", file=sys.stderr)
            continue
        if kind == "prefill":
            cap = ctx + 8
            arena = model.new_arena(batch * cap + 64)
            locs = [KVLocation(((i * cap + 7 * i, ctx),)) for i in range(batch)]
            prompts = [tuple(torch.randint(0, spec.vocab_size, (ctx,), generator=gen).tolist()) for _ in range(batch)]
            fb = ForwardBatch.build([SequenceInput(p, 0, loc) for p, loc in zip(prompts, locs)], device=model.device)
            work = StepWork.build(prefill_new_tokens=[ctx] * batch)
        else:
            locs, size = decode_locations(kind, batch, ctx + 1, rng)
            arena = model.new_arena(size)
            toks = torch.randint(0, spec.vocab_size, (batch,), generator=gen).tolist()
            views = cost.view_rule() if kind in ("decode_views", "decode_split") else None
            fb = ForwardBatch.build([SequenceInput((t,), ctx, loc) for t, loc in zip(toks, locs)], device=model.device,
                                    views=views)
            reads = [loc.run_tokens(ctx + 1) for loc in locs]
            work = StepWork.build(decode_read_runs=reads, views=views)
            case.runs = sum(len(r) for r in reads) / len(reads)
            case.split_reads = len(work.decode_split_parts)
            case.views = work.decode_group_views
            assert (fb.split_reads.num_seqs if fb.split_reads is not None else 0) == case.split_reads
            assert len(fb.decode_groups) == len(work.decode_group_sizes)
            assert sum(g.view_start is not None for g in fb.decode_groups) == work.decode_group_views
        with torch.no_grad():
            for t in (*arena.k, *arena.v):  # real-looking KV: timing must not ride on zeros
                t.normal_(generator=gen) if t.device.type == "cpu" else t.normal_()

        def run(model=model, fb=fb, arena=arena) -> None:
            with torch.no_grad():
                model.forward(fb, arena)

        case.run = run
        case.predicted_s = cost.step_time(work).time_s
        cases.append(case)
    return cases


def time_cases(cases: list[Case], backend: Any, repeats: int) -> None:
    """Round-robin timing: a warm-up round, then ``repeats`` rounds of one run per case."""
    for r in range(repeats + 1):
        for case in cases:
            timer = backend.timer()
            c0 = time.thread_time()
            timer.start()
            assert case.run is not None
            case.run()
            t = timer.stop()
            if r > 0:
                case.times.append(t)
                case.cpu_times.append(time.thread_time() - c0)


def _rel(c: dict[str, Any]) -> float:
    return abs(c["predicted_s"] - c["measured_s"]) / c["measured_s"]


def summarize(cases: list[dict[str, Any]], max_error: float) -> dict[str, Any]:
    """Held-out medians (overall and per kind), the shaping cases' median, and the verdict."""
    held = [c for c in cases if c["held_out"]]
    shaping = [c for c in cases if not c["held_out"]]
    med = statistics.median(_rel(c) for c in held) if held else float("nan")
    by_kind = {k: statistics.median(_rel(c) for c in held if c["kind"] == k)
               for k in KINDS if any(c["kind"] == k for c in held)}
    return {"median_abs_rel_error": med, "median_abs_rel_error_by_kind": by_kind,
            "shaping_median_abs_rel_error": statistics.median(_rel(c) for c in shaping) if shaping else None,
            "held_out_cases": len(held), "shaping_cases": len(shaping), "max_error": max_error,
            "verdict": "PASS" if held and med <= max_error else "FAIL"}


def _profile_threads(profile: DeviceProfile) -> int | None:
    """Torch threads the profile was measured with (provenance.torch_threads), if recorded."""
    n = (profile.provenance or {}).get("torch_threads")
    return int(n) if isinstance(n, int) and n > 0 else None


def validate_emulator_main(ns: argparse.Namespace) -> int:
    import torch

    from odma_mlu.backends import get_backend
    from odma_mlu.models.loader import load_model

    repeats = getattr(ns, "repeats", None) or DEFAULT_REPEATS
    max_error = getattr(ns, "max_error", None)
    max_error = DEFAULT_MAX_ERROR if max_error is None else max_error
    profile = load_profile(ns.profile)
    backend = get_backend(ns.backend)
    check_profile_for_backend(profile, backend.name)
    threads = _profile_threads(profile)
    if backend.device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    model, spec, _ = load_model(ns.model, backend=backend, with_tokenizer=False)
    cost = CostModel(profile, spec, dtype=str(model.dtype).replace("torch.", ""))
    cases = build_cases(model, spec, cost)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    time_cases(cases, backend, repeats)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    # Default: the backend's own timer (wall clock on CPU). On a shared host that also
    # measures other processes' load, so `--timer thread-cpu` (CPU backend, one torch
    # thread: every op runs on this thread) reports this thread's CPU time instead.
    cpu_timed = (getattr(ns, "timer", "backend") == "thread-cpu" and backend.device.type == "cpu"
                 and torch.get_num_threads() == 1)
    rows: list[dict[str, Any]] = []
    print(f"{'kind':<15} {'batch':>5} {'context':>7} {'runs':>5} {'measured':>10} {'predicted':>10} {'ratio':>6}  split")
    for c in cases:
        wall = statistics.median(c.times)
        measured = statistics.median(c.cpu_times) if cpu_timed else wall
        row = {"kind": c.kind, "batch": c.batch, "context_tokens": c.context_tokens, "measured_s": measured,
               "predicted_s": c.predicted_s, "held_out": c.held_out, "measured_wall_s": wall,
               "runs_per_sequence": c.runs, "split_reads": c.split_reads, "views": c.views}
        rows.append(row)
        print(f"{c.kind:<15} {c.batch:>5} {c.context_tokens:>7} {c.runs:>5.1f} {measured * 1e3:>8.3f}ms "
              f"{c.predicted_s * 1e3:>8.3f}ms {c.predicted_s / measured:>6.2f}  {'held-out' if c.held_out else 'shaping'}")
    rule = cost.view_rule()
    for kind, key in (("decode_views", "views"), ("decode_split", "split_reads")):
        if not any(r[key] for r in rows if r["kind"] == kind and r["batch"] > 1):
            print(f"note: {kind} read nothing that way at this model's view length "
                  f"({rule.min_tokens if rule else None} tokens, from the profile): its cases time gathered reads")
    summary = summarize(rows, max_error)
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in summary["median_abs_rel_error_by_kind"].items())
    print(f"held-out median |predicted - measured| / measured per kind: {kinds}")
    print(f"(shaping cases: {summary['shaping_median_abs_rel_error']:.3f} over {summary['shaping_cases']}; "
          f"measured = {'thread CPU time' if cpu_timed else 'wall clock'}; torch threads {torch.get_num_threads()}; "
          f"load average {load_before} -> {load_after})")
    print(f"{summary['verdict']}: held-out median |predicted - measured| / measured = "
          f"{summary['median_abs_rel_error']:.3f} over {summary['held_out_cases']} cases "
          f"({'<=' if summary['verdict'] == 'PASS' else '>'} {max_error:g})")
    if summary["verdict"] == "FAIL":
        measured_on = (profile.provenance or {}).get("date", "an unknown date")
        print(f"note: the profile was measured on {measured_on}; a host's speed drifts between runs, so the "
              "verdict assumes a profile of this host measured just before (odma-mlu profile-bandwidth "
              f"--backend {backend.name})")
    if ns.json:
        doc = {"cases": rows, **summary, "profile": str(ns.profile), "model": str(ns.model),
               "backend": backend.name, "torch_threads": torch.get_num_threads(), "repeats": repeats,
               "load_average": [load_before, load_after],
               "measured_timer": "thread_cpu_time" if cpu_timed else "wall_clock"}
        Path(ns.json).write_text(json.dumps(doc, indent=2))
    return 0 if summary["verdict"] == "PASS" else 1
