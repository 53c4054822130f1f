#!/usr/bin/env python
"""Split odma's gap to ``ideal`` into free preemption and the rest (docs/results.md).

Replays one trace under odma, paged and ideal, then under ideal once more with its free
preemption switched off (one-token pages read at the stream rate, no watermark, but every
preempted request swapped or recomputed, and charged, as under the other policies)::

    .venv/bin/python tools/ideal_gap.py --trace servegen-r1 --max-requests 1000 --seed 0

The second ideal is a diagnostic bound, not a policy the CLI offers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.bench import resolve_predictor  # noqa: E402
from emulator.profile import load_profile  # noqa: E402
from emulator.replay import ReplayResult, kv_capacity_tokens, replay  # noqa: E402
from emulator.traces import load_trace  # noqa: E402
from odma_mlu.cli import add_chunked_prefill_arg, add_swap_space_arg, swap_space_bytes  # noqa: E402
from odma_mlu.config import CacheConfig, SchedulerConfig, load_model_spec  # noqa: E402
from odma_mlu.kvcache.paged import IdealPolicy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="servegen-r1")
    ap.add_argument("--max-requests", type=int, default=1000)
    ap.add_argument("--max-new-tokens", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="mlu370-x4")
    ap.add_argument("--kv-capacity-tokens", type=int, default=None,
                    help="KV capacity (default: what the profile's card holds for the 7B shape)")
    ap.add_argument("--json", type=Path, default=None)
    add_chunked_prefill_arg(ap)
    add_swap_space_arg(ap)
    ns = ap.parse_args(argv)
    model = load_model_spec()
    profile = load_profile(ns.profile)
    trace = load_trace(ns.trace, seed=ns.seed, max_requests=ns.max_requests, max_new_tokens=ns.max_new_tokens)
    cap = ns.kv_capacity_tokens or kv_capacity_tokens(profile, model, CacheConfig())
    if cap <= 0:
        ap.error(f"--kv-capacity-tokens must be positive, got {cap}")

    def run(policy: str) -> ReplayResult:
        return replay(trace, policy, model, profile, max_new_tokens=ns.max_new_tokens, capacity_tokens=cap,
                      cache=replace(CacheConfig(), swap_space_bytes=swap_space_bytes(ns)),
                      scheduler_config=SchedulerConfig(enable_chunked_prefill=ns.chunked_prefill),
                      predictor=resolve_predictor(None))

    rows: dict[str, ReplayResult] = {p: run(p) for p in ("odma", "paged", "ideal")}
    IdealPolicy.free_preemption = False  # this process only: the bound that pays for its preemptions
    try:
        rows["ideal_paid"] = run("ideal")
    finally:
        IdealPolicy.free_preemption = True
    print(f"{'policy':<18}{'tps':>9}{'kv_util':>9}{'preempt':>9}{'runs':>9}")
    for name, r in rows.items():
        print(f"{name:<18}{r.tps:>9.2f}{r.kv_utilization:>9.3f}{r.preemptions:>9}{r.runs_per_request:>9.1f}")
    odma, ideal, paid = rows["odma"].tps, rows["ideal"].tps, rows["ideal_paid"].tps
    print(f"odma/ideal {odma / ideal:.3f}; odma/ideal_paid {odma / paid:.3f}; free preemption is "
          f"{(ideal - paid) / ideal * 100:.1f} of the {(ideal - odma) / ideal * 100:.1f} points")
    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps({k: r.metrics() for k, r in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
