"""Sensitivity sweep of the odma policy's constants (docs/odma-sensitivity.md).

The default ``OdmaConfig`` is replayed once, then each field is varied alone around it on
one trace, everything else fixed; each row gives its tok/s as a ratio to the default's.
Prints the table as it goes and optionally writes JSON.

    python tools/odma_sweep.py --trace servegen-r1 --max-requests 3000 --max-new-tokens 32768 \
        --seed 8 --json out/sweep-servegen-8.json

Development data only: ServeGen samples of seeds 8-13 (3,000 requests saturate the card;
seeds 0-2 are the acceptance sets, reported, never tuned on) and the first records of the
Alpaca/Vicuna train file.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace

from emulator.bench import resolve_predictor
from emulator.profile import load_profile
from emulator.replay import kv_capacity_tokens, replay
from emulator.traces import load_trace
from odma_mlu.cli import add_chunked_prefill_arg
from odma_mlu.config import CacheConfig, OdmaConfig, SchedulerConfig, load_model_spec

GRID: dict[str, list[object]] = {
    "num_buckets": [2, 4, 16],
    "histogram_window": [500, 8000],
    "reoptimize_every": [50, 1000],
    "drift_detection": [False],
    "histogram_bin_tokens": [64],
    "safety_fraction": [0.0, 0.2],
    "uncertainty_ratio": [1.5, 10.0],
    "long_request_tokens": [1024, 16384],
    "target_coverage": [0.5, 0.95],
    "growth_factor": [1.25, 4.0],
    "elastic": [False],
    "chunk_tokens": [32, 64],
    "claim_admission_factor": [1.5, 3.0],
    "compact": [False],
    "compact_from_tokens": [300, 1200],
    "compact_room_fraction": [0.05, 0.2],
    "compact_room_min_fraction": [0.01, 0.05],
    "compact_copy_fraction": [0.004, 0.01],
    "granule_tokens": [8],
}
"""Every OdmaConfig field, each with values on either side of its default (the defaults
are read from OdmaConfig, never repeated here). The common admission watermark is
CacheConfig's (vLLM's 0.01), the same for every policy: not swept."""

assert set(GRID) == {f.name for f in fields(OdmaConfig)}, "every OdmaConfig field has a row in GRID"


def main(argv: list[str] | None = None) -> int:
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
    ns = ap.parse_args(argv)
    fields_swept = ns.only.split(",") if ns.only else list(GRID)
    unknown = [f for f in fields_swept if f not in GRID]
    if unknown:
        ap.error(f"--only: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(GRID)}")
    model = load_model_spec()
    profile = load_profile(ns.profile)
    trace = load_trace(ns.trace, seed=ns.seed, max_requests=ns.max_requests, max_new_tokens=ns.max_new_tokens)
    cap = kv_capacity_tokens(profile, model, CacheConfig())
    default = OdmaConfig()
    runs = [("(default)", None)] + [(f, v) for f in fields_swept for v in GRID[f] if v != getattr(default, f)]
    print(f"{'field':<26}{'value':>8}{'tps':>9}{'vs dflt':>9}{'kv_util':>9}{'preempt':>9}{'runs':>8}{'copied':>8}",
          flush=True)
    rows = []
    base_tps = None
    for f, v in runs:
        odma = default if v is None else replace(default, **{f: v})
        r = replay(trace, "odma", model, profile, cache=replace(CacheConfig(), odma=odma),
                   scheduler_config=SchedulerConfig(enable_chunked_prefill=ns.chunked_prefill),
                   max_new_tokens=ns.max_new_tokens, capacity_tokens=cap, predictor=resolve_predictor(ns.predictor))
        base_tps = r.tps if base_tps is None else base_tps
        rows.append({"field": f, "value": v, "tps_vs_default": r.tps / base_tps, **r.metrics()})
        print(f"{f:<26}{'' if v is None else v!s:>8}{r.tps:>9.2f}{r.tps / base_tps:>9.4f}{r.kv_utilization:>9.3f}"
              f"{r.preemptions:>9}{r.runs_per_request:>8.2f}{r.copied_kv_fraction:>8.4f}", flush=True)
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump({"trace": ns.trace, "max_requests": ns.max_requests, "seed": ns.seed, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
