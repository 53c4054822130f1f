"""Sensitivity sweep of the odma policy's constants (docs/odma-sensitivity.md).

Each OdmaConfig field is varied alone around its default on one trace; everything else
fixed. Prints a table and optionally writes JSON.

    python tools/odma_sweep.py --trace alpaca-vicuna --max-requests 2000 --json out/sweep-alpaca.json
    python tools/odma_sweep.py --trace servegen-r1 --max-requests 300 --max-new-tokens 32768 --seed 0 \
        --json out/sweep-servegen.json

Development data only: the first records of the Alpaca/Vicuna train file, and ServeGen
requests sampled with seed 0 (the reported ServeGen figures use seeds 1 and 2 too).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from emulator.bench import resolve_predictor
from emulator.profile import load_profile
from emulator.replay import kv_capacity_tokens, replay
from emulator.traces import load_trace
from odma_mlu.cli import add_chunked_prefill_arg
from odma_mlu.config import CacheConfig, OdmaConfig, SchedulerConfig, load_model_spec

GRID: dict[str, list[object]] = {
    "num_buckets": [2, 4, 8, 16],
    "target_coverage": [0.5, 0.8, 0.95],
    "safety_fraction": [0.0, 0.1, 0.3],
    "uncertainty_ratio": [1.5, 3.0, 10.0],
    "long_request_tokens": [1024, 4096, 16384],
    "growth_factor": [1.25, 2.0],
    "elastic": [False, True],
    "chunk_tokens": [1, 16, 64],
    "claim_admission_factor": [0.0, 1.5, 3.0],
    "drift_detection": [False, True],
}
"""The v2 constants (OdmaConfig), each varied alone around its default. The common
admission watermark is CacheConfig's (vLLM's 0.01), the same for every policy: not swept."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default="alpaca-vicuna")
    ap.add_argument("--profile", default="mlu370-x4")
    ap.add_argument("--max-requests", type=int, default=4000)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--predictor", default=None)
    ap.add_argument("--only", default=None, help="comma-separated fields to sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    add_chunked_prefill_arg(ap)
    ns = ap.parse_args()
    model = load_model_spec()
    profile = load_profile(ns.profile)
    trace = load_trace(ns.trace, seed=ns.seed, max_requests=ns.max_requests, max_new_tokens=ns.max_new_tokens)
    cap = kv_capacity_tokens(profile, model, CacheConfig())
    fields = ns.only.split(",") if ns.only else list(GRID)
    rows = []
    print(f"{'field':<24}{'value':>8}{'tps':>9}{'kv_util':>9}{'res_eff':>9}{'overflow':>9}{'preempt':>9}"
          f"{'runs':>8}{'copied':>8}", flush=True)
    for f in fields:
        for v in GRID[f]:
            cache = replace(CacheConfig(), odma=replace(OdmaConfig(), **{f: v}))
            r = replay(trace, "odma", model, profile, cache=cache, scheduler_config=SchedulerConfig(enable_chunked_prefill=ns.chunked_prefill),
                       max_new_tokens=ns.max_new_tokens, capacity_tokens=cap,
                       predictor=resolve_predictor(ns.predictor))
            rows.append({"field": f, "value": v, **r.metrics()})
            print(f"{f:<24}{v!s:>8}{r.tps:>9.1f}{r.kv_utilization:>9.3f}{r.reservation_efficiency:>9.3f}"
                  f"{r.overflow_rate:>9.3f}{r.preemptions:>9}{r.runs_per_request:>8.2f}{r.copied_kv_fraction:>8.4f}",
                  flush=True)
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
