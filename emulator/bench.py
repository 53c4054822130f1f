"""``odma-mlu bench``: replay a trace under each KV policy on an emulated device.

Prints one row per policy, and optionally writes the JSON of DESIGN.md and a plot (KV in
use over time per policy, and throughput bars).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from emulator.hetero_policy import HETERO_BASELINES
from emulator.hybrid_policy import HYBRID_BASELINES
from emulator.profile import DeviceProfile, load_profile
from emulator.replay import TIME_PARTS, ReplayResult, kv_bytes_per_token, kv_capacity_tokens, replay
from emulator.traces import Trace, load_trace
from odma_mlu.cli import swap_space_bytes
from odma_mlu.config import CacheConfig, ModelSpec, SchedulerConfig, load_model_spec
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.factory import POLICY_NAMES
from odma_mlu.models.layer_kinds import LayerKinds, load_layer_kinds
from odma_mlu.predictor.base import LengthPredictor

TABLE_COLUMNS = (("policy", "{}"), ("completed", "{:>9}"), ("lost", "{:>4}"), ("tps", "{:>8.1f}"),
                 ("backlog_tps", "{:>11.1f}"), ("rps", "{:>6.2f}"), ("kv_utilization", "{:>14.3f}"),
                 ("reservation_efficiency", "{:>22.3f}"),
                 ("overflow_rate", "{:>13.3f}"), ("preemptions", "{:>11}"), ("num_swaps", "{:>9}"),
                 ("runs_per_request", "{:>16.3f}"),
                 ("copied_kv_fraction", "{:>18.4f}"), ("max_concurrent", "{:>14}"),
                 ("held_per_request_mib", "{:>20.1f}"), ("makespan_s", "{:>10.1f}"))
ONLINE_COLUMNS = (("ttft_p50_s", "{:>10.3f}"), ("ttft_p99_s", "{:>10.3f}"), ("tpot_p50_s", "{:>10.4f}"),
                  ("tpot_p99_s", "{:>10.4f}"))


def positive_arg(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type for the bench tools: ``kind(text)``, which must be > 0."""
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse: "invalid int value: 'x'"
    return parse


def parse_policies(text: str, sliding: bool = False, hybrid: bool = False) -> list[str]:
    """``--policies``; ``sliding``: the model has sliding-window layers, so the paged
    baselines for such models (``HETERO_BASELINES``) are accepted too; ``hybrid``: it has SSM
    layers, so the hybrid schemes (``HYBRID_BASELINES``) are."""
    allowed = POLICY_NAMES + (HETERO_BASELINES if sliding else ()) + (HYBRID_BASELINES if hybrid else ())
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in allowed]
    if bad or not names:
        why = "".join(f" ({', '.join(only)}: only for {kind})" for only, kind in (
            ([p for p in bad if p in HETERO_BASELINES], "models with sliding-window layers"),
            ([p for p in bad if p in HYBRID_BASELINES], "hybrid (SSM) models")) if only)
        raise ConfigError(f"--policies: unknown {bad or text!r}{why}; choose from {','.join(allowed)}")
    return names


def resolve_predictor(name_or_dir: str | None) -> LengthPredictor:
    """A predictor by name or folder (``odma_mlu.predictor.registry``); None = the default
    (online lengths, the bundled learned model where it proves calibrated)."""
    from odma_mlu.predictor.registry import load_predictor

    return load_predictor(name_or_dir)


def run_bench(trace: Trace, policies: Sequence[str], model: ModelSpec, profile: DeviceProfile, *,
              predictor_name: str | None = None, kv_gib: float | None = None, max_new_tokens: int | None = None,
              mode: str = "offline", rate_scale: float = 1.0, cache: CacheConfig = CacheConfig(),
              scheduler: SchedulerConfig = SchedulerConfig(), progress: bool = True,
              layers: LayerKinds | None = None, state_fraction: float | None = None) -> list[ReplayResult]:
    """Replay ``trace`` under each policy; one fresh predictor per policy (no shared learning).
    ``layers``: the model's layer kinds (sliding-window or SSM layers change the layout and
    prices); ``state_fraction``: a hybrid's tuned split (None: tuned on ``trace``)."""
    cap_new = max_new_tokens or trace.max_new_tokens or scheduler.max_new_tokens
    capacity = kv_capacity_tokens(profile, model, cache, kv_gib, layers)
    results: list[ReplayResult] = []
    for name in policies:
        predictor = resolve_predictor(predictor_name) if name in ("odma", "s3") else None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(trace.requests), desc=f"{name:>7}", unit="req", leave=False, file=sys.stderr)
        t0 = time.perf_counter()
        res = replay(trace, name, model, profile, cache=cache, scheduler_config=scheduler, max_new_tokens=cap_new,
                     capacity_tokens=capacity, predictor=predictor, mode=mode, rate_scale=rate_scale,
                     progress=bar.update if bar is not None else None, layers=layers, state_fraction=state_fraction)
        if bar is not None:
            bar.close()
        if progress:
            print(f"  {name}: replayed in {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
        results.append(res)
    return results


def format_table(results: Sequence[ReplayResult], online: bool) -> str:
    """One row per policy; each column as wide as its name or its widest value (the policy
    name left-aligned, figures right-aligned)."""
    cols = TABLE_COLUMNS + (ONLINE_COLUMNS if online else ())
    rows: list[list[str]] = []
    for r in results:
        m = r.metrics()
        m["held_per_request_mib"] = r.held_per_request_bytes / 2**20
        row = []
        for name, fmt in cols:
            v = m.get(name)
            row.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v).strip())
        rows.append(row)
    return _aligned([name for name, _ in cols], rows)


def format_time_split(results: Sequence[ReplayResult]) -> str:
    """Where each policy's step time went (``ReplayResult.time_split_s``): seconds of emulated
    time per part, each with its share of the busy time, so policies compare part by part."""
    rows = []
    for r in results:
        split = r.time_split_s
        busy = split.get("busy_s", 0.0)
        rows.append([r.policy, str(r.num_steps), f"{busy:.1f}"]
                    + [f"{split.get(k, 0.0):.1f} ({100 * split.get(k, 0.0) / busy if busy else 0.0:.1f}%)"
                       for k in TIME_PARTS])
    return "time by part (emulated s):\n" + _aligned(["policy", "steps", "busy_s", *TIME_PARTS], rows)


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as wide as their name or widest value; the first left-aligned, the rest right."""
    widths = [max([len(name)] + [len(row[i]) for row in rows]) for i, name in enumerate(header)]
    lines = [" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(header, widths)))]
    for row in rows:
        lines.append(" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def write_plot(results: Sequence[ReplayResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.5), gridspec_kw={"width_ratios": [2.2, 1, 1.2]})
    for r in results:
        cap = r.capacity_tokens
        line, = ax1.plot(r.timeline_s, [x / cap for x in r.timeline_live_tokens], label=f"{r.policy}", lw=1.2)
        ax1.plot(r.timeline_s, [x / cap for x in r.timeline_reserved_tokens], lw=0.8, ls="--",
                 color=line.get_color(), alpha=0.7)
    ax1.set_xlabel("time (s, emulated)")
    ax1.set_ylabel("share of KV capacity")
    ax1.set_ylim(0, 1.05)
    ax1.set_title("KV in use over time (solid: live tokens, dashed: reserved)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    names = [r.policy for r in results]
    ax2.bar(names, [r.tps for r in results], color="tab:blue")
    for i, r in enumerate(results):
        ax2.text(i, r.tps, f"{r.tps:.0f}", ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("generated tokens / s")
    ax2.tick_params(axis="x", labelrotation=30)
    ax2.set_title("throughput")
    # Where each policy's step time went (``ReplayResult.time_split_s``), stacked.
    bottom = [0.0] * len(results)
    for part in TIME_PARTS:
        values = [r.time_split_s.get(part, 0.0) for r in results]
        ax3.bar(names, values, bottom=bottom, label=part.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax3.set_ylabel("emulated step time (s)")
    ax3.tick_params(axis="x", labelrotation=30)
    ax3.set_title("time by part")
    ax3.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_configs(ns: argparse.Namespace) -> tuple[CacheConfig, SchedulerConfig]:
    """The replay's cache and scheduler configs: ``--config``'s sections (else the defaults),
    with every cache or scheduler flag that was given on top."""
    cache, sched = CacheConfig(), SchedulerConfig()
    if ns.config:
        from odma_mlu.server.settings import load_serve_file

        engine, _ = load_serve_file(ns.config)
        cache, sched = engine.cache, engine.scheduler
    if ns.page_size is not None:
        cache = replace(cache, page_size_tokens=ns.page_size)
    if ns.swap_space_gib is not None:
        cache = replace(cache, swap_space_bytes=swap_space_bytes(ns))
    flags = {"max_num_seqs": ns.max_num_seqs, "enable_chunked_prefill": ns.chunked_prefill,
             "max_prefill_chunk_tokens": ns.max_prefill_chunk_tokens,
             "max_num_batched_tokens": ns.max_num_batched_tokens}
    sched = replace(sched, **{k: v for k, v in flags.items() if v is not None})
    return cache, sched


def bench_main(ns: argparse.Namespace) -> int:
    if ns.max_requests is not None and ns.max_requests <= 0:
        raise ConfigError(f"--max-requests must be >= 1, got {ns.max_requests}")
    if ns.max_new_tokens is not None and ns.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
    slo_ttft, slo_tpot = getattr(ns, "slo_ttft_s", None), getattr(ns, "slo_tpot_s", None)
    slo = None
    if slo_ttft is not None or slo_tpot is not None:
        if slo_ttft is None or slo_tpot is None or ns.mode != "online":
            raise ConfigError("goodput needs --mode online with both --slo-ttft-s and --slo-tpot-s")
        slo = (slo_ttft, slo_tpot)
    profile = load_profile(ns.profile)
    if getattr(ns, "decode_attention", None) is not None:
        profile = replace(profile, decode_attention=ns.decode_attention)
    layers = load_layer_kinds(ns.model)
    hybrid = layers.ssm is not None
    model = layers.ssm.base if layers.ssm is not None else load_model_spec(ns.model)  # a hybrid's attention shape
    sliding = layers.num_sliding > 0
    baselines = (HETERO_BASELINES if sliding else ()) + (HYBRID_BASELINES if hybrid else ())
    policies = parse_policies(ns.policies or ",".join(POLICY_NAMES + baselines), sliding, hybrid)
    trace = load_trace(ns.trace, seed=ns.seed, max_requests=ns.max_requests, max_new_tokens=ns.max_new_tokens)
    cache, sched = bench_configs(ns)
    capacity = kv_capacity_tokens(profile, model, cache, ns.kv_gib, layers)
    if sliding:
        kinds = f"{layers.num_full} full + {layers.num_sliding} sliding-window ({layers.window_tokens}) layers"
    elif hybrid:
        kinds = f"{layers.num_full} attention + {layers.num_ssm} SSM layers, states and KV in one budget"
    else:
        kinds = f"{model.num_layers} layers"
    bytes_per_token = kv_bytes_per_token(model, layers)
    print(f"profile {profile.name} | model {model.name} ({model.dtype}, {kinds}) | trace {trace.name}: "
          f"{len(trace.requests)} requests | KV capacity {capacity} tokens "
          f"({capacity * bytes_per_token / 1024**3:.2f} GiB) | mode {ns.mode} | decode attention "
          f"{profile.decode_attention}")
    results = run_bench(trace, policies, model, profile, predictor_name=ns.predictor, kv_gib=ns.kv_gib,
                        max_new_tokens=ns.max_new_tokens, mode=ns.mode, rate_scale=ns.rate_scale, cache=cache,
                        scheduler=sched, progress=not ns.no_progress, layers=layers)
    print(format_table(results, ns.mode == "online"))
    print(format_time_split(results))
    goodput = None
    if slo is not None:
        from emulator.goodput import find_goodput, format_goodput_table, log_stderr, trace_arrival_rps

        base_rps = trace_arrival_rps(trace)
        goodput = []
        for name, first in zip(policies, results):
            def run_at(scale: float, name: str = name) -> ReplayResult:
                return run_bench(trace, [name], model, profile, predictor_name=ns.predictor, kv_gib=ns.kv_gib,
                                 max_new_tokens=ns.max_new_tokens, mode="online", rate_scale=scale, cache=cache,
                                 scheduler=sched, progress=False, layers=layers)[0]
            goodput.append(find_goodput(run_at, base_rps, *slo, start_scale=ns.rate_scale, first=first,
                                        max_runs=getattr(ns, "goodput_runs", 8), policy=name,
                                        log=None if ns.no_progress else log_stderr))
        print(format_goodput_table(goodput))
    if any(r.lost for r in results):
        print("WARNING: requests were lost: this is a bug", file=sys.stderr)
    if any(r.rejected for r in results):
        print(f"note: {max(r.rejected for r in results)} request(s) could never fit and were rejected",
              file=sys.stderr)
    if ns.json:
        doc = {"profile": profile.name, "decode_attention": profile.decode_attention, "model": model.name,
               "trace": trace.name, "mode": ns.mode, "capacity_tokens": capacity,
               "results": [r.metrics() for r in results]}
        if goodput is not None:
            doc["rate_scale"] = ns.rate_scale
            for row, g in zip(doc["results"], goodput):
                row.update(g.metrics())
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(doc, indent=2))
        print(f"wrote {ns.json}")
    if ns.plot:
        write_plot(results, ns.plot, f"{trace.name} on {profile.name}, {model.name}")
        print(f"wrote {ns.plot}")
    return 1 if any(r.lost for r in results) else 0
