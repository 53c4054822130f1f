"""``odma-mlu generate`` and ``odma-mlu validate-emulator``: thin layers over the engine."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from odma_mlu.config import SchedulerConfig
from odma_mlu.errors import ConfigError

VALIDATE_BATCHES = (1, 4, 16)
VALIDATE_CONTEXTS = (64, 256, 1024)
VALIDATE_REPEATS = 15


def default_predictor() -> object:
    """The bundled learned length predictor, or the histogram baseline (with a note on
    stderr) when this checkout has not built it (``make predictor``)."""
    from emulator.bench import resolve_predictor

    try:
        return resolve_predictor(None)
    except ConfigError as e:
        print(f"note: {e}; using the histogram baseline predictor", file=sys.stderr)
        return resolve_predictor("simple")


def generate_main(ns: argparse.Namespace) -> int:
    from odma_mlu.engine.llm_engine import LLMEngine
    from odma_mlu.engine.sampler import SamplingParams

    if ns.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
    predictor = default_predictor() if ns.kv_policy in ("odma", "s3") else None
    sched = replace(SchedulerConfig(), max_new_tokens=ns.max_new_tokens)
    engine = LLMEngine(ns.model, kv_policy=ns.kv_policy, backend=ns.backend, dtype=ns.dtype,
                       kv_capacity_tokens=max(4096, 4 * ns.max_new_tokens), predictor=predictor, scheduler=sched,
                       seed=ns.seed)
    params = SamplingParams(temperature=ns.temperature, seed=ns.seed, max_new_tokens=ns.max_new_tokens)
    out = engine.generate([ns.prompt], params)[0]
    text = engine.decode(out.token_ids)
    print(text)
    if ns.json:
        doc = {"text": text, "token_ids": list(out.token_ids), "kv_policy": ns.kv_policy,
               "overflows": engine.policy.overflowed_requests, "preemptions": engine.scheduler.num_preemptions,
               "finish_reason": out.finish_reason}
        Path(ns.json).write_text(json.dumps(doc, indent=2))
    return 0


def _profile_threads(profile: object) -> int | None:
    """Torch threads the profile was measured with (provenance.torch_threads), if recorded."""
    prov = getattr(profile, "provenance", {}) or {}
    n = prov.get("torch_threads") if isinstance(prov, dict) else None
    return int(n) if isinstance(n, int) and n > 0 else None


def validate_emulator_main(ns: argparse.Namespace) -> int:
    """Time real decode steps and put the cost model's prediction beside each.

    Every case (batch x context) is prefilled once, then timed ``repeats`` times
    round-robin over the cases (one step of each case per round), so a burst of load
    from another process spreads over all cases instead of bending one; the first round
    is warm-up and each case reports the median of the rest. On CPU, torch runs with the
    thread count the profile was measured with (provenance.torch_threads). ``measured_s`` is
    the backend's timer unless ``--timer thread-cpu`` asks for the thread's CPU time (see
    below); ``measured_wall_s`` is always the wall clock.
    """
    import os
    import time

    import torch

    from emulator.cost_model import CONTIGUOUS, CostModel
    from emulator.profile import load_profile
    from odma_mlu.backends import get_backend
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import ForwardBatch, SequenceInput
    from odma_mlu.models.loader import load_model

    repeats = getattr(ns, "repeats", None) or VALIDATE_REPEATS
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    batches = tuple(getattr(ns, "batches", None) or VALIDATE_BATCHES)
    contexts = tuple(getattr(ns, "contexts", None) or VALIDATE_CONTEXTS)
    backend = get_backend(ns.backend)
    profile = load_profile(ns.profile)
    threads = _profile_threads(profile)
    if backend.device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    model, spec, _ = load_model(ns.model, backend=backend, with_tokenizer=False)
    cost = CostModel(profile, spec, dtype=str(model.dtype).replace("torch.", ""))
    gen = torch.Generator().manual_seed(0)
    setups = []
    for batch in batches:
        for ctx in contexts:
            if ctx + 1 > spec.max_position_embeddings:
                print(f"skip batch {batch} context {ctx}: past the model's {spec.max_position_embeddings} positions")
                continue
            cap = ctx + 8
            arena = model.new_arena(batch * cap)
            locs = [KVLocation(capacity_tokens=cap, start_slot=i * cap) for i in range(batch)]
            # Fill the KV with a real prefill once (random tokens), then time decode steps.
            prompts = [torch.randint(0, spec.vocab_size, (ctx,), generator=gen).tolist() for _ in range(batch)]
            model.forward(ForwardBatch.build([SequenceInput(tuple(p), 0, l) for p, l in zip(prompts, locs)],
                                             device=model.device), arena)
            fb = ForwardBatch.build([SequenceInput((p[-1],), ctx, l) for p, l in zip(prompts, locs)],
                                    device=model.device)
            setups.append((batch, ctx, fb, arena, [], []))
    if len(setups) < 1:
        raise ConfigError(f"no case fits the model's {spec.max_position_embeddings} positions; lower the contexts")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for r in range(repeats + 1):
        for batch, ctx, fb, arena, times, cpu_times in setups:
            timer = backend.timer()
            c0 = time.thread_time()
            timer.start()
            model.forward(fb, arena)
            t = timer.stop()
            if r > 0:  # the first round is warm-up
                times.append(t)
                cpu_times.append(time.thread_time() - c0)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cases = []
    # Default: the backend's own timer (wall clock on CPU), as the DESIGN asks. On a shared
    # host that also measures other processes' load, so `--timer thread-cpu` (CPU backend,
    # one torch thread) reports this thread's CPU time instead; wall time is always kept.
    cpu_timed = (getattr(ns, "timer", "backend") == "thread-cpu" and backend.device.type == "cpu"
                 and torch.get_num_threads() == 1)
    for batch, ctx, fb, arena, times, cpu_times in setups:
        wall = statistics.median(times)
        predicted = cost.step((), [ctx] * batch, CONTIGUOUS, num_decode_groups=len(fb.decode_groups)).time_s
        # On CPU with one torch thread every op runs on this thread, so its CPU time is the
        # step's time on the core without the time other processes held it: on a shared
        # host the wall clock measures their load, not the step. Wall time is kept beside it.
        measured = statistics.median(cpu_times) if cpu_timed else wall
        case = {"batch": batch, "context_tokens": ctx, "measured_s": measured, "predicted_s": predicted,
                "measured_wall_s": wall}
        cases.append(case)
        print(f"batch {batch:>3} context {ctx:>5}: measured {measured * 1e3:8.2f} ms  "
              f"predicted {predicted * 1e3:8.2f} ms  ratio {predicted / measured:5.2f}")
    errs = [abs(c["predicted_s"] - c["measured_s"]) / c["measured_s"] for c in cases]
    med = statistics.median(errs)
    print(f"median |predicted - measured| / measured = {med:.3f} over {len(cases)} cases "
          f"(measured = {'thread CPU time' if cpu_timed else 'wall clock'}; torch threads "
          f"{torch.get_num_threads()}, load average {load_before} -> {load_after})")
    if ns.json:
        doc = {"cases": cases, "median_abs_rel_error": med, "profile": str(ns.profile), "model": str(ns.model),
               "backend": backend.name, "torch_threads": torch.get_num_threads(), "repeats": repeats,
               "load_average": [load_before, load_after],
               "measured_timer": "thread_cpu_time" if cpu_timed else "wall_clock"}
        Path(ns.json).write_text(json.dumps(doc, indent=2))
    return 0
