"""Sensitivity sweep of the odma policy's constants (docs/odma-sensitivity.md).

The default ``OdmaConfig`` is replayed once, then each field is varied alone around it on
one trace, everything else fixed; each row gives its tok/s as a ratio to the default's.
Prints the table as it goes and optionally writes JSON.

    python tools/odma_sweep.py --trace servegen-r1 --max-requests 3000 --max-new-tokens 32768 \
        --seed 8 --json out/sweep-servegen-8.json --plot out/sweep-servegen-8.png
    python tools/odma_sweep.py --from-json out/sweep-servegen-8.json out/sweep-servegen-9.json \
        --plot docs/img/odma-sweep-servegen.png      # draw saved sweeps side by side, no replay

Development data only: ServeGen samples of seeds 8-13 (3,000 requests saturate the card;
seeds 0-2 are the acceptance sets, reported, never tuned on) and the first records of the
Alpaca/Vicuna train file.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

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


def _row_key(row: dict[str, Any]) -> tuple[str, str]:
    """A row's (field, value) as it is written in the JSON: how rows of two sweeps match."""
    return row["field"], json.dumps(row["value"])


def plot(sweeps: list[dict[str, Any]], path: str) -> None:
    """One bar per row and sweep: tok/s against the default's, in percent, grouped by field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [_row_key(r) for r in sweeps[0]["rows"] if r["value"] is not None]
    height = 0.8 / len(sweeps)
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(keys) + 1.5))
    for k, sweep in enumerate(sweeps):
        pct = {_row_key(r): 100.0 * (r["tps_vs_default"] - 1.0) for r in sweep["rows"]}
        ys = [i + k * height for i in range(len(keys))]
        ax.barh(ys, [pct.get(key, 0.0) for key in keys], height=height,
                label=f"{sweep['trace']}, seed {sweep['seed']}, {sweep['max_requests']} requests")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(keys))])
    ax.set_yticklabels([f"{f} = {v}" for f, v in keys], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.0, color="grey", lw=0.8)
    # Linear within +-0.5% (most constants), logarithmic past it (the switches that turn a part off).
    ax.set_xscale("symlog", linthresh=0.5)
    ticks = [-30, -10, -3, -1, -0.5, -0.25, 0, 0.25, 0.5, 1]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=7)
    ax.set_xlim(min(ticks[0], ax.get_xlim()[0]), max(ticks[-1], ax.get_xlim()[1]))
    ax.set_xlabel("tok/s against the default OdmaConfig (%; linear within 0.5, logarithmic beyond)")
    ax.set_title("Each odma constant varied alone", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_sweep(ap: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """A sweep written by ``--json``; a usage error naming the file where it is not one."""
    try:
        sweep = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        ap.error(f"--from-json: cannot read a sweep from {path}: {e}")
    if not isinstance(sweep, dict) or "rows" not in sweep:
        ap.error(f"--from-json: {path} is not a sweep written by --json (no 'rows')")
    return sweep


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
    ap.add_argument("--plot", default=None, metavar="OUT.png", help="draw the rows as bars against the default")
    ap.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                    help="draw sweeps written by --json (needs --plot); nothing is replayed")
    add_chunked_prefill_arg(ap)
    ns = ap.parse_args(argv)
    if ns.from_json:
        if not ns.plot:
            ap.error("--from-json draws saved sweeps: give --plot OUT.png")
        plot([_read_sweep(ap, f) for f in ns.from_json], ns.plot)
        print(f"wrote {ns.plot}")
        return 0
    fields_swept = ns.only.split(",") if ns.only else list(GRID)
    unknown = [f for f in fields_swept if f not in GRID]
    if unknown:
        ap.error(f"--only: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(GRID)}")
    model = load_model_spec()
    profile = load_profile(ns.profile)
    trace = load_trace(ns.trace, seed=ns.seed, max_requests=ns.max_requests, max_new_tokens=ns.max_new_tokens)
    cap = kv_capacity_tokens(profile, model, CacheConfig())
    default = OdmaConfig()
    variants = [("(default)", None)] + [(f, v) for f in fields_swept for v in GRID[f] if v != getattr(default, f)]
    print(f"{'field':<26}{'value':>8}{'tps':>9}{'vs dflt':>9}{'kv_util':>9}{'preempt':>9}{'runs':>8}{'copied':>8}",
          flush=True)
    rows: list[dict[str, Any]] = []
    base_tps: float | None = None
    for f, v in variants:
        odma = default if v is None else replace(default, **{f: v})
        r = replay(trace, "odma", model, profile, cache=replace(CacheConfig(), odma=odma),
                   scheduler_config=SchedulerConfig(enable_chunked_prefill=ns.chunked_prefill),
                   max_new_tokens=ns.max_new_tokens, capacity_tokens=cap, predictor=resolve_predictor(ns.predictor))
        base_tps = r.tps if base_tps is None else base_tps
        rows.append({"field": f, "value": v, "tps_vs_default": r.tps / base_tps, **r.metrics()})
        print(f"{f:<26}{'' if v is None else v!s:>8}{r.tps:>9.2f}{r.tps / base_tps:>9.4f}{r.kv_utilization:>9.3f}"
              f"{r.preemptions:>9}{r.runs_per_request:>8.2f}{r.copied_kv_fraction:>8.4f}", flush=True)
    doc = {"trace": ns.trace, "max_requests": ns.max_requests, "seed": ns.seed, "rows": rows}
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    if ns.plot:
        plot([doc], ns.plot)
        print(f"wrote {ns.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
