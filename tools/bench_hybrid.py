"""Hybrid (SSM + attention) memory schemes on an emulated device, under the engine's scheduler:
``odma-mlu bench``'s ``run_bench`` for each hybrid shape x trace (padded unified pool (vLLM),
static splits, AVMP, and the engine's own layout). Prints a table per pair and writes JSON.

    .venv/bin/python tools/bench_hybrid.py                      # both shapes, both traces, MLU370-X4
    .venv/bin/python tools/bench_hybrid.py --max-requests 600 --json out/hybrid.json

Results and reading: docs/hybrid.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator.bench import format_table, parse_policies, positive_arg, run_bench  # noqa: E402
from emulator.hybrid_policy import tuned_state_fraction  # noqa: E402
from emulator.hybrid_traces import SHAREGPT_DEV, drifting_trace, sharegpt_trace  # noqa: E402
from emulator.profile import load_profile  # noqa: E402
from emulator.replay import ReplayResult, kv_capacity_tokens  # noqa: E402
from odma_mlu.cli import add_chunked_prefill_arg  # noqa: E402
from odma_mlu.config import CacheConfig, SchedulerConfig  # noqa: E402
from odma_mlu.errors import ConfigError  # noqa: E402
from odma_mlu.models.hybrid_spec import BUILTIN_HYBRID_SHAPES  # noqa: E402
from odma_mlu.models.layer_kinds import LayerKinds, load_layer_kinds  # noqa: E402

DEFAULT_POLICIES = "padded_unified,static_split_0.5,static_split_tuned,avmp,odma"


def describe_extra(r: ReplayResult) -> str:
    """The budget share not live while requests waited (1 - kv_utilization: live KV and states
    over the budget), requests that never fit, and what the scheme itself counted: AVMP's
    capacity moves, the padded pool's pages."""
    x = r.policy_extra
    waste = f"capacity wasted {1.0 - r.kv_utilization:.1%}"
    if r.rejected:
        waste += f", {r.rejected} rejected (never fit)"
    if "migrations_to_states" in x:
        return (f"{r.policy}: {waste}, migrations {x['migrations_to_states']:.0f} KV->states + "
                f"{x['migrations_to_kv']:.0f} states->KV, state copies {x['state_moved_bytes'] / 2**30:.2f} GiB, "
                f"state slots at the end {x['state_slots']:.0f}")
    if "block_tokens" in x:
        return (f"{r.policy}: {waste}, block {x['block_tokens']:.0f} tokens, "
                f"state padded {x['state_padding_ratio']:.2f}x")
    return f"{r.policy}: {waste}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="mlu370-x4")
    ap.add_argument("--models", default=",".join(BUILTIN_HYBRID_SHAPES), help="comma-separated hybrid shapes")
    ap.add_argument("--data", type=Path, default=SHAREGPT_DEV, help="ShareGPT pairs JSONL (tokens = chars / 4)")
    ap.add_argument("--max-requests", type=positive_arg(int), default=1000)
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--max-new-tokens", type=positive_arg(int), default=None,
                    help="the server's generation cap; default: the longest output of the data (none is cut)")
    ap.add_argument("--cache-gib", type=positive_arg(float), default=None,
                    help="KV + state budget; default: 90%% of device memory minus the weights")
    ap.add_argument("--max-num-seqs", type=positive_arg(int), default=SchedulerConfig.max_num_seqs)
    ap.add_argument("--json", type=Path, default=Path("out/bench_hybrid.json"))
    add_chunked_prefill_arg(ap)
    args = ap.parse_args(argv)
    profile = load_profile(args.profile)
    try:
        policies = parse_policies(args.policies, hybrid=True)
    except ConfigError as e:
        ap.error(str(e))
    sharegpt = sharegpt_trace(args.data, args.max_requests)
    traces = (sharegpt, drifting_trace(sharegpt))
    max_new_tokens = args.max_new_tokens or max(r.output_tokens for r in sharegpt.requests)
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, enable_chunked_prefill=args.chunked_prefill)
    cache = CacheConfig()
    rows: list[dict[str, object]] = []
    t0 = time.perf_counter()
    for name in (n.strip() for n in args.models.split(",") if n.strip()):
        layers = load_layer_kinds(name)
        if layers.ssm is None:
            ap.error(f"--models: {name} has no SSM layers; tools/bench_hetero.py or odma-mlu bench benchmarks it")
        hybrid, model = layers.ssm, layers.ssm.base
        fraction = tuned_state_fraction(hybrid, sharegpt)  # what an operator tunes on ShareGPT, for both traces
        capacity = kv_capacity_tokens(profile, model, cache, args.cache_gib, layers)
        for trace in traces:
            print(f"\n{name} | {trace.name}: {len(trace.requests)} requests | budget "
                  f"{capacity * hybrid.kv_bytes_per_token / 2**30:.2f} GiB ({capacity} KV tokens of "
                  f"{LayerKinds.from_hybrid(hybrid).num_full} attention layers; a state is "
                  f"{hybrid.state_bytes_per_request / 2**20:.1f} MiB) | tuned state share {fraction:.2f} | "
                  f"max_new_tokens {max_new_tokens}", flush=True)
            results = run_bench(trace, policies, model, profile, kv_gib=args.cache_gib, max_new_tokens=max_new_tokens,
                                cache=cache, scheduler=scheduler, progress=False, layers=layers,
                                state_fraction=fraction)
            print(format_table(results, online=False))
            for r in results:
                print("  " + describe_extra(r))
                rows.append({"model": name, "trace": trace.name, "state_fraction": fraction,
                             "capacity_tokens": capacity, **r.metrics()})
            sys.stdout.flush()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"profile": profile.name, "max_new_tokens": max_new_tokens,
                                     "results": rows}, indent=1))
    print(f"wrote {args.json} ({time.perf_counter() - t0:.1f} s)")
    return 1 if any(row["lost"] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
