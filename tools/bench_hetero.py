"""KV policies on models with sliding-window layers: for each shape x trace, ``odma-mlu bench``'s
replay (emulator/bench.py ``run_bench``: the engine's scheduler, ODMA in the engine's ring
layout, the paged baselines jenga / vllm_hybrid / vllm_uniform as KV policies). Prints one
table per pair and writes every row, tagged with model and trace, to one JSON.

    .venv/bin/python tools/bench_hetero.py                    # both shapes, both traces, MLU370-X4
    .venv/bin/python tools/bench_hetero.py --max-requests 300 --models gemma-3-12b

Results and reading: docs/hetero.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator.bench import format_table, parse_policies, positive_arg, run_bench  # noqa: E402
from emulator.profile import DeviceProfile, load_profile  # noqa: E402
from emulator.replay import kv_capacity_tokens  # noqa: E402
from emulator.traces import load_trace  # noqa: E402
from odma_mlu.cli import add_chunked_prefill_arg  # noqa: E402
from odma_mlu.config import CacheConfig, ModelSpec, SchedulerConfig, load_model_spec  # noqa: E402
from odma_mlu.errors import ConfigError, OdmaError  # noqa: E402
from odma_mlu.models.layer_kinds import LayerKinds, load_layer_kinds  # noqa: E402

NO_ROOM_KV_GIB = 6.0
"""KV budget where the weights leave none on the profile (Gemma-3-12B on a 24 GB card)."""


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def kv_gib_for(profile: DeviceProfile, model: ModelSpec, kv_gib: float | None) -> float | None:
    """``kv_gib``, else None (the profile's capacity, as ``run_bench`` computes it), else
    ``NO_ROOM_KV_GIB`` where the weights leave no room for KV."""
    if kv_gib is not None:
        return kv_gib
    try:
        kv_capacity_tokens(profile, model, CacheConfig())
    except ConfigError:
        return NO_ROOM_KV_GIB
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="mlu370-x4", help="device profile name or YAML path")
    ap.add_argument("--models", default="gemma-3-12b,qwen2-7b-swa", help="comma-separated shapes with sliding layers")
    ap.add_argument("--traces", default="sharegpt-dev,alpaca-vicuna", help="comma-separated trace names or paths")
    ap.add_argument("--policies", default="odma,paged,jenga,vllm_hybrid,vllm_uniform",
                    help="comma-separated KV policies (odma-mlu bench's, with the sliding-window baselines)")
    ap.add_argument("--max-requests", type=positive_arg(int), default=1000, help="first N requests of each trace")
    ap.add_argument("--max-new-tokens", type=positive_arg(int), default=2048)
    ap.add_argument("--kv-gib", type=positive_arg(float), default=None,
                    help="KV budget for every policy; default: the profile's capacity minus the weights, "
                         f"or {NO_ROOM_KV_GIB:g} GiB where the weights leave none (Gemma-3-12B on a 24 GB card)")
    ap.add_argument("--json", type=Path, default=Path("out/bench_hetero.json"))
    ap.add_argument("--no-progress", action="store_true")
    add_chunked_prefill_arg(ap)
    args = ap.parse_args(argv)

    # Every flag is checked before the first replay.
    try:
        policies = parse_policies(args.policies, sliding=True)
    except ConfigError as e:
        ap.error(str(e))
    try:
        profile = load_profile(args.profile)
    except OdmaError as e:
        ap.error(f"--profile: {e}")
    models: list[tuple[ModelSpec, LayerKinds]] = []
    for name in _names(args.models):
        try:
            layers = load_layer_kinds(name)
        except OdmaError as e:
            ap.error(f"--models: {e}")
        if layers.ssm is not None:
            ap.error(f"--models: {name} is a hybrid (SSM) shape; tools/bench_hybrid.py benchmarks it")
        if layers.num_sliding == 0:
            ap.error(f"--models: {name} has no sliding-window layers; odma-mlu bench --model {name} covers it")
        models.append((load_model_spec(name), layers))
    traces = []
    for name in _names(args.traces):
        try:
            traces.append(load_trace(name, max_requests=args.max_requests, max_new_tokens=args.max_new_tokens))
        except OdmaError as e:
            ap.error(f"--traces: {e}")
    if not models or not traces:
        ap.error("--models and --traces each need at least one name")

    t0 = time.perf_counter()
    rows: list[dict[str, object]] = []
    lost = False
    for model, layers in models:
        kv_gib = kv_gib_for(profile, model, args.kv_gib)
        for trace in traces:
            results = run_bench(trace, policies, model, profile, kv_gib=kv_gib, max_new_tokens=args.max_new_tokens,
                                scheduler=SchedulerConfig(enable_chunked_prefill=args.chunked_prefill),
                                progress=not args.no_progress, layers=layers)
            capacity_gib = results[0].capacity_tokens * model.kv_bytes_per_token / 2**30
            print(f"\n{model.name} | {trace.name}: {len(trace.requests)} requests | {profile.name}, "
                  f"KV {capacity_gib:.2f} GiB")
            print(format_table(results, online=False))
            rows.extend({"model": model.name, "trace": trace.name, **r.metrics()} for r in results)
            lost = lost or any(r.lost for r in results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"profile": profile.name, "max_new_tokens": args.max_new_tokens,
                                     "results": rows}, indent=1))
    print(f"\nwrote {args.json} ({time.perf_counter() - t0:.1f} s)")
    if lost:
        print("WARNING: requests were lost: this is a bug", file=sys.stderr)
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
