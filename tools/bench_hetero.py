"""KV memory schemes for models with sliding-window layers on an emulated device: ODMA with
rings, Jenga's LCM allocator, vLLM's hybrid manager, vLLM uniform. Prints a table, writes JSON.

    .venv/bin/python tools/bench_hetero.py                          # both shapes, both traces, MLU370-X4
    .venv/bin/python tools/bench_hetero.py --max-requests 300 --models gemma-3-12b
    .venv/bin/python tools/bench_hetero.py --schemes odma_engine_rings --ring-block-tokens 8

Results and reading: docs/hetero.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator.hetero_replay import (ALPACA, SHAREGPT_DEV, StalledScheme, alpaca_trace,  # noqa: E402
                                    cache_budget_bytes, format_table, load_shape, replay, schemes, sharegpt_trace,
                                    step_cost)
from emulator.profile import load_profile  # noqa: E402
from odma_mlu.kvcache.window import RING_BLOCK_TOKENS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="mlu370-x4")
    ap.add_argument("--models", default="gemma-3-12b,qwen2-7b-swa", help="comma-separated shapes with sliding layers")
    ap.add_argument("--sharegpt", type=Path, default=SHAREGPT_DEV)
    ap.add_argument("--alpaca", type=Path, default=ALPACA)
    ap.add_argument("--max-requests", type=int, default=1000)
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--kv-gib", type=float, default=None,
                    help="KV budget for every scheme; default: 90%% of device memory minus the weights, "
                         "or 6 GiB where the weights alone exceed that (Gemma-3-12B on a 24 GB card)")
    ap.add_argument("--schemes", default="", help="comma-separated scheme labels to replay (default: all)")
    ap.add_argument("--ring-block-tokens", type=int, default=RING_BLOCK_TOKENS,
                    help="B, ring slots per block of the engine's ring layout (odma_engine_rings)")
    ap.add_argument("--json", type=Path, default=Path("out/bench_hetero.json"))
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if args.ring_block_tokens <= 0:
        ap.error(f"--ring-block-tokens must be >= 1, got {args.ring_block_tokens}")
    profile = load_profile(args.profile)
    traces = {"sharegpt": sharegpt_trace(args.sharegpt, args.max_requests),
              "alpaca": alpaca_trace(args.alpaca, args.max_requests)}
    t0 = time.perf_counter()
    results = []
    stalled: list[str] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        shape = load_shape(name)
        if args.kv_gib is not None:
            budget = int(args.kv_gib * 2**30)
        else:
            try:
                budget = cache_budget_bytes(profile, shape)
            except ValueError:
                budget = 6 * 2**30
        cost = step_cost(profile, shape)
        for trace_name, trace in traces.items():
            compared = schemes(shape, budget, profile, args.max_new_tokens, trace,
                               ring_block_tokens=args.ring_block_tokens)
            unknown = sorted(set(wanted) - set(compared))
            if unknown:
                ap.error(f"--schemes: unknown {', '.join(unknown)} (known: {', '.join(compared)})")
            for label, make in compared.items():
                if wanted and label not in wanted:
                    continue
                try:
                    r = replay(trace, make(), cost, trace_name, args.max_new_tokens)
                except StalledScheme as e:
                    stalled.append(f"{name} {trace_name} {label}: {e}")
                    print(f"  {name} {trace_name} {label}: STALLED ({e})", file=sys.stderr)
                    continue
                results.append(r)
                print(f"  {name} {trace_name} {r.scheme}: {r.tps:.1f} tok/s", file=sys.stderr)
    print(format_table(results))
    for line in stalled:
        print(f"stalled (no result): {line}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"profile": profile.name, "max_new_tokens": args.max_new_tokens,
                                     "results": [asdict(r) for r in results], "stalled": stalled}, indent=1))
    print(f"wrote {args.json} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
