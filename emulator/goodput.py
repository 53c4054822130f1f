"""Goodput: the highest arrival rate at which an SLO on p99 TTFT and p99 TPOT still holds.

``odma-mlu bench --mode online --slo-ttft-s X --slo-tpot-s Y`` runs, per policy, a bounded
search over the trace's rate scale (arrival times divided by the scale)::

    probe the start scale (--rate-scale; its replay is the latency table's row, reused)
    bracket: meets the SLO -> x4 until a probe fails; fails -> /4 until a probe meets
    bisect geometrically between the highest meeting and the lowest failing scale
    stop after ``max_runs`` replays (default 8) or when they are within 2% of each other

A probe meets the SLO when no request is lost, p99 TTFT <= X and p99 TPOT <= Y (DESIGN.md
"Metrics"). ``goodput_rps`` = the highest meeting scale x the trace's own arrival rate
(requests / span between its first and last arrival): requests per second OFFERED at that
scale. The search assumes p99 latency grows with the rate (true of a FIFO scheduler
under load up to noise near the knee); every probe is kept in the JSON so a reader can
see the curve it walked.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable

from emulator.replay import ReplayResult
from emulator.traces import Trace
from odma_mlu.errors import ConfigError

DEFAULT_MAX_RUNS = 8
BRACKET_FACTOR = 4.0
REL_TOL = 0.02


@dataclass(frozen=True)
class Probe:
    rate_scale: float
    arrival_rps: float
    ttft_p99_s: float | None
    tpot_p99_s: float | None
    lost: int
    meets_slo: bool


@dataclass
class GoodputResult:
    policy: str
    slo_ttft_s: float
    slo_tpot_s: float
    goodput_rps: float
    """Arrival rate at the highest scale that met the SLO (0.0 when none did)."""
    rate_scale: float | None
    """That scale (None when no probe met the SLO)."""
    bounded: bool
    """A failing probe lies above ``rate_scale`` (False: the SLO held at every probe, so
    goodput is at least ``goodput_rps``)."""
    at_goodput: ReplayResult | None
    probes: list[Probe] = field(default_factory=list)

    def metrics(self) -> dict[str, object]:
        return {"goodput_rps": self.goodput_rps, "goodput_rate_scale": self.rate_scale,
                "goodput_bounded": self.bounded, "slo_ttft_s": self.slo_ttft_s, "slo_tpot_s": self.slo_tpot_s,
                "goodput_ttft_p99_s": self.at_goodput.ttft_p99_s if self.at_goodput else None,
                "goodput_tpot_p99_s": self.at_goodput.tpot_p99_s if self.at_goodput else None,
                "goodput_probes": [p.__dict__ for p in self.probes]}


def trace_arrival_rps(trace: Trace) -> float:
    """Requests per second of ``trace`` at rate scale 1 (over its first-to-last arrival span)."""
    times = [r.arrival_s for r in trace.requests]
    span = max(times) - min(times) if times else 0.0
    if len(times) < 2 or span <= 0:
        raise ConfigError(f"trace {trace.name!r} has no spread of arrival times; goodput needs a timed (online) "
                          "trace such as azure-code")
    return len(times) / span


def meets_slo(r: ReplayResult, slo_ttft_s: float, slo_tpot_s: float) -> bool:
    if r.lost or r.ttft_p99_s is None or r.ttft_p99_s > slo_ttft_s:
        return False
    return r.tpot_p99_s is None or r.tpot_p99_s <= slo_tpot_s


def find_goodput(run: Callable[[float], ReplayResult], base_rps: float, slo_ttft_s: float, slo_tpot_s: float, *,
                 start_scale: float = 1.0, first: ReplayResult | None = None, max_runs: int = DEFAULT_MAX_RUNS,
                 policy: str = "", log: Callable[[str], None] | None = None) -> GoodputResult:
    """Search the rate scale for the highest one whose replay meets the SLO (see module doc).

    ``run(scale)`` replays the trace online at ``scale``; ``first``, when given, is its
    result at ``start_scale`` (reused as the first probe)."""
    if slo_ttft_s <= 0 or slo_tpot_s <= 0:
        raise ConfigError(f"SLO limits must be positive, got TTFT {slo_ttft_s} s and TPOT {slo_tpot_s} s")
    if max_runs < 1:
        raise ConfigError(f"goodput search needs at least 1 run, got {max_runs}")
    probes: list[Probe] = []
    results: dict[float, ReplayResult] = {}

    def probe(scale: float) -> bool:
        r = first if (first is not None and not probes and scale == start_scale) else run(scale)
        ok = meets_slo(r, slo_ttft_s, slo_tpot_s)
        probes.append(Probe(scale, scale * base_rps, r.ttft_p99_s, r.tpot_p99_s, r.lost, ok))
        results[scale] = r
        if log is not None:
            log(f"  goodput {policy}: scale {scale:.4g} ({scale * base_rps:.3f} req/s): TTFT p99 "
                f"{_fmt(r.ttft_p99_s)} s, TPOT p99 {_fmt(r.tpot_p99_s)} s -> {'meets' if ok else 'misses'} the SLO")
        return ok

    lo: float | None = None  # highest scale that met the SLO
    hi: float | None = None  # lowest scale that missed it
    scale = start_scale
    while len(probes) < max_runs and (lo is None or hi is None):
        if probe(scale):
            lo = scale
            scale *= BRACKET_FACTOR
        else:
            hi = scale
            scale /= BRACKET_FACTOR
    while len(probes) < max_runs and lo is not None and hi is not None and hi / lo > 1.0 + REL_TOL:
        mid = math.sqrt(lo * hi)
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(policy=policy, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s,
                         goodput_rps=lo * base_rps if lo is not None else 0.0, rate_scale=lo, bounded=hi is not None,
                         at_goodput=results.get(lo) if lo is not None else None, probes=probes)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_goodput_table(rows: list[GoodputResult]) -> str:
    lines = [f"goodput (SLO: p99 TTFT <= {rows[0].slo_ttft_s:g} s, p99 TPOT <= {rows[0].slo_tpot_s:g} s)" if rows
             else "goodput", "policy  goodput_rps rate_scale ttft_p99_s tpot_p99_s runs"]
    for g in rows:
        at = g.at_goodput
        rps = f"{g.goodput_rps:.3f}" + ("" if g.bounded else "+")
        scale = "-" if g.rate_scale is None else f"{g.rate_scale:.4g}"
        lines.append(f"{g.policy:<7} {rps:>11} {scale:>10} {_fmt(at.ttft_p99_s if at else None):>10} "
                     f"{_fmt(at.tpot_p99_s if at else None):>10} {len(g.probes):>4}")
    if any(not g.bounded for g in rows):
        lines.append("+: the SLO held at every probe; goodput is at least this")
    if any(g.rate_scale is None for g in rows):
        lines.append("0.000: no probe met the SLO (lowest probe in the JSON's goodput_probes)")
    return "\n".join(lines)


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
