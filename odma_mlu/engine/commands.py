"""``odma-mlu generate``: a thin layer over the engine (``validate-emulator`` lives in emulator/validate.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from odma_mlu.config import SchedulerConfig
from odma_mlu.errors import ConfigError


def default_predictor() -> object:
    """The default predictor (``auto``: online lengths, the bundled learned model where it
    proves calibrated), or the online one alone (with a note on stderr) if the bundled
    model cannot be read."""
    from odma_mlu.predictor.registry import load_predictor

    try:
        return load_predictor(None)
    except ConfigError as e:
        print(f"note: {e}; using the histogram baseline predictor", file=sys.stderr)
        return load_predictor("simple")


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
