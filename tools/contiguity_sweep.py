"""Where contiguity pays: odma/paged and ideal/paged against the gather/sequential ratio.

The MLU370 profile is derived, not measured, and its gather curve decides how much a
paged layout loses: it prices a 16-token page of the 7B shape (K of one layer:
16 tokens x 4 KV heads x 128 x fp16 = 16 KiB) at 93% of sequential bandwidth. This tool
replays the same traces under profiles that differ ONLY in the gather curve, so an
operator who measures a card reads off the winner at that card's ratio.

How the gather curve is reshaped for a target ratio ``r`` at the page's run size
``P`` (16 KiB): every run read at a random offset pays a fixed access cost on top of
streaming its bytes, worth ``c`` bytes of sequential streaming, so::

    ratio_r(n) = n / (n + c),   c = P (1 - r) / r          (ratio_r(P) = r exactly)
    gather_r(n) = sequential(n) * ratio_r(n)

One parameter, physically the latency of opening a new burst/row at a random address
(r = 0.3 -> c = 37 KiB; r = 0.93 -> c = 1.2 KiB; r = 1 -> c = 0: gather equals sequential
and paging is free). Everything else (sequential curve, compute, launch overhead,
capacity) is the derived profile's. The derived curve itself is not of this form (it
keeps 45% at 64 B, 97% at 64 KiB); the row ``derived`` replays the unmodified profile for
reference next to the family's r = 0.93.

    python tools/contiguity_sweep.py                         # Alpaca (3000) + ServeGen (1000)
    python tools/contiguity_sweep.py --quick                 # 300 requests each, 3 ratios

Writes docs/contiguity-sweep.json and docs/img/contiguity-sweep.png; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emulator.bench import run_bench  # noqa: E402
from emulator.profile import BandwidthCurve, CurvePoint, DeviceProfile, load_profile  # noqa: E402
from emulator.traces import load_trace  # noqa: E402
from odma_mlu.cli import add_chunked_prefill_arg, add_swap_space_arg, swap_space_bytes  # noqa: E402
from odma_mlu.config import DEFAULT_MODEL, CacheConfig, SchedulerConfig, load_model_spec  # noqa: E402
from odma_mlu.server.settings import load_serve_file  # noqa: E402

RATIOS = (0.3, 1.0, 0.6, 0.8, 0.93, 0.5, 0.7, 0.4, 0.9)  # run in this order; reported sorted
POLICIES = ("odma", "paged", "ideal")
ALPACA = str(ROOT.parent / "shared" / "data" / "lengths" / "alpaca_vicuna7b_train.jsonl")


def reshaped_ratio(ratio: float, page_bytes: float, n: float) -> float:
    """gather/sequential at run size ``n`` bytes when the ratio is ``ratio`` at ``page_bytes``."""
    c = page_bytes * (1.0 - ratio) / ratio
    return n / (n + c)


def reshape_profile(base: DeviceProfile, ratio: float, page_bytes: float) -> DeviceProfile:
    """``base`` with its gather curve replaced so locality(page_bytes) == ratio (see module doc)."""
    sizes = [64.0 * 2.0 ** i for i in range(0, 19)]  # 64 B .. 16 MiB, log-spaced knots
    if page_bytes not in sizes:
        sizes = sorted(sizes + [page_bytes])
    note = f"contiguity sweep: ratio {ratio:g} at {page_bytes:g} B (tools/contiguity_sweep.py)"
    pts = tuple(CurvePoint(x, base.sequential.at(x) * reshaped_ratio(ratio, page_bytes, x), "derived", note)
                for x in sizes)
    return replace(base, name=f"{base.name}@gather{ratio:g}", gather=BandwidthCurve(pts))


def sweep(args: argparse.Namespace) -> dict:
    base = load_profile(args.profile)
    if args.decode_attention is not None:
        base = replace(base, decode_attention=args.decode_attention)
    model = load_model_spec(args.model)
    cache = load_serve_file(args.config)[0].cache if args.config else CacheConfig()
    if args.swap_space_gib is not None:
        cache = replace(cache, swap_space_bytes=swap_space_bytes(args))
    page_bytes = cache.page_size_tokens * model.kv_bytes_per_token_per_layer // 2  # K of one layer
    traces = []
    if "alpaca" in args.traces:
        traces.append(("alpaca-vicuna-train", load_trace(args.alpaca, max_requests=args.alpaca_requests,
                                                         max_new_tokens=512)))
    if "servegen" in args.traces:
        traces.append(("servegen-r1", load_trace("servegen-r1", seed=0, max_requests=args.servegen_requests,
                                                 max_new_tokens=32768)))
    profiles: list[tuple[str, float, DeviceProfile]] = [("derived", base.locality(page_bytes), base)]
    for r in args.ratios:
        p = reshape_profile(base, r, page_bytes)
        assert abs(p.locality(page_bytes) - r) < 1e-6, (r, p.locality(page_bytes))
        profiles.append((f"{r:g}", r, p))
    doc: dict = {"profile": base.name, "decode_attention": base.decode_attention, "model": model.name,
                 "page_size_tokens": cache.page_size_tokens,
                 "page_run_bytes": page_bytes, "derived_ratio_at_page": base.locality(page_bytes),
                 "policies": list(POLICIES), "reshape": "gather_r(n) = sequential(n) * n / (n + c), c = P (1 - r) / r, P = page_run_bytes",
                 "traces": {}}
    for tname, trace in traces:
        rows = []
        for label, r, prof in profiles:
            t0 = time.perf_counter()
            res = run_bench(trace, POLICIES, model, prof, cache=cache, progress=False,
                            scheduler=SchedulerConfig(enable_chunked_prefill=args.chunked_prefill))
            tps = {x.policy: x.tps for x in res}
            row = {"label": label, "ratio_at_page": r, **{f"{k}_tps": v for k, v in tps.items()},
                   "odma_over_paged": tps["odma"] / tps["paged"], "ideal_over_paged": tps["ideal"] / tps["paged"],
                   "lost": sum(x.lost for x in res), "preemptions": {x.policy: x.preemptions for x in res}}
            rows.append(row)
            rows.sort(key=lambda x: (x["label"] != "derived", x["ratio_at_page"]))
            doc["traces"][tname] = {"requests": len(trace.requests), "max_new_tokens": trace.max_new_tokens,
                                    "rows": rows}
            if args.json:  # a checkpoint after every row: a long sweep cut short keeps what it measured
                Path(args.json).write_text(json.dumps(doc, indent=2))
            print(f"{tname:<20} ratio {label:>7}: odma {tps['odma']:8.1f} paged {tps['paged']:8.1f} "
                  f"ideal {tps['ideal']:8.1f}  odma/paged {row['odma_over_paged']:.3f}  "
                  f"ideal/paged {row['ideal_over_paged']:.3f}  ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    return doc


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(doc["traces"]), figsize=(6 * len(doc["traces"]), 4.2), squeeze=False)
    for ax, (tname, t) in zip(axes[0], doc["traces"].items()):
        rows = [r for r in t["rows"] if r["label"] != "derived"]
        rows = sorted(rows, key=lambda r: r["ratio_at_page"])
        xs = [r["ratio_at_page"] for r in rows]
        ax.plot(xs, [r["odma_over_paged"] for r in rows], "o-", label="odma / paged")
        ax.plot(xs, [r["ideal_over_paged"] for r in rows], "s--", label="ideal / paged")
        d = next(r for r in t["rows"] if r["label"] == "derived")
        ax.plot([d["ratio_at_page"]], [d["odma_over_paged"]], "k*", ms=11, label="odma / paged, derived profile")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axvline(d["ratio_at_page"], color="grey", lw=0.6, ls=":")
        ax.set_xlabel(f"gather / sequential bandwidth at a {doc['page_size_tokens']}-token page "
                      f"({doc['page_run_bytes'] // 1024} KiB run)")
        ax.set_ylabel("throughput relative to paged")
        ax.set_title(f"{tname} ({t['requests']} requests, max {t['max_new_tokens']} new)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Where contiguity pays: {doc['model']} on {doc['profile']}\nwith its gather curve reshaped "
                 f"(decode attention: {doc.get('decode_attention', 'in_place')})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="mlu370-x4")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--alpaca", default=ALPACA)
    ap.add_argument("--alpaca-requests", type=int, default=3000)
    ap.add_argument("--servegen-requests", type=int, default=1000)
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=list(RATIOS))
    ap.add_argument("--quick", action="store_true", help="300 requests per trace, ratios 0.3, 0.93, 1.0")
    ap.add_argument("--json", default=str(ROOT / "out" / "contiguity-sweep.json"))
    ap.add_argument("--plot", default=str(ROOT / "out" / "contiguity-sweep.png"))
    ap.add_argument("--traces", default="alpaca,servegen", help="comma-separated subset of alpaca,servegen")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no replay: merge the traces of these sweep JSONs into --json and plot them")
    ap.add_argument("--config", default=None, metavar="FILE",
                    help="an `odma-mlu serve` YAML file whose cache: section every replay uses (ODMA's "
                         "constants and granule, the page size, swap space); default: CacheConfig's defaults")
    ap.add_argument("--decode-attention", choices=("gather", "in_place"), default=None,
                    help="how decode attention reads runs (default: the profile's, else gather, what the code "
                         "issues); in_place reproduces the sweeps measured before the twelfth session")
    add_chunked_prefill_arg(ap)
    add_swap_space_arg(ap, default=None)
    args = ap.parse_args(argv)
    if args.merge:
        doc = json.loads(Path(args.merge[0]).read_text())
        for other in args.merge[1:]:  # rows of a trace in several files are pooled (one per label)
            for tname, t in json.loads(Path(other).read_text())["traces"].items():
                mine = doc["traces"].setdefault(tname, {**t, "rows": []})
                labels = {r["label"] for r in mine["rows"]}
                mine["rows"] += [r for r in t["rows"] if r["label"] not in labels]
                mine["rows"].sort(key=lambda x: (x["label"] != "derived", x["ratio_at_page"]))
        Path(args.json).write_text(json.dumps(doc, indent=2))
        plot(doc, Path(args.plot))
        print(f"wrote {args.json} and {args.plot}", file=sys.stderr)
        return 0
    if args.quick:
        args.alpaca_requests, args.servegen_requests, args.ratios = 300, 300, [0.3, 0.93, 1.0]
    doc = sweep(args)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)
    plot(doc, Path(args.plot))
    print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
