"""Hybrid-model memory schemes on an emulated device: padded unified pool (vLLM), static
dual pools, AVMP capacity migration. Prints a table and writes JSON.

    .venv/bin/python tools/bench_hybrid.py                      # both shapes, both traces, MLU370-X4
    .venv/bin/python tools/bench_hybrid.py --max-requests 600 --json out/hybrid.json

Results and reading: docs/hybrid.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator.hybrid_replay import (SHAREGPT_DEV, drifting_trace, format_table, load_pairs, run_all,  # noqa: E402
                                    sharegpt_trace, write_json)
from emulator.profile import load_profile  # noqa: E402
from odma_mlu.models.hybrid_spec import BUILTIN_HYBRID_SHAPES, load_hybrid_spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="mlu370-x4")
    ap.add_argument("--models", default=",".join(BUILTIN_HYBRID_SHAPES), help="comma-separated hybrid shapes")
    ap.add_argument("--data", type=Path, default=SHAREGPT_DEV, help="ShareGPT pairs JSONL (tokens = chars / 4)")
    ap.add_argument("--max-requests", type=int, default=1000)
    ap.add_argument("--cache-gib", type=float, default=None,
                    help="KV + state budget; default: 90%% of device memory minus the weights")
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--json", type=Path, default=Path("out/bench_hybrid.json"))
    args = ap.parse_args(argv)
    profile = load_profile(args.profile)
    pairs = load_pairs(args.data, args.max_requests)
    traces = {"sharegpt": sharegpt_trace(pairs), "drifting": drifting_trace(pairs)}
    hybrids = [load_hybrid_spec(name.strip()) for name in args.models.split(",") if name.strip()]
    budget = None if args.cache_gib is None else int(args.cache_gib * 2**30)
    t0 = time.perf_counter()
    results = run_all(hybrids, profile, traces, budget, args.max_num_seqs)
    print(format_table(results))
    for r in results:
        if r.notes:
            print(f"{r.model} {r.trace} padded_unified: block {r.notes['block_tokens']:.0f} tokens, "
                  f"state padded {r.notes['state_padding_ratio']:.2f}x")
    write_json(results, args.json, profile)
    print(f"wrote {args.json} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
