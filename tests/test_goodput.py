"""Goodput search (emulator/goodput.py) and ``bench --slo-ttft-s/--slo-tpot-s``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from emulator.goodput import find_goodput, meets_slo
from emulator.replay import ReplayResult
from odma_mlu.cli import main

_BASE = ReplayResult(policy="p", completed=10, lost=0, rejected=0, makespan_s=1.0, generated_tokens=10, tps=10.0,
                     rps=10.0, kv_utilization=0.5, kv_utilization_all=0.5, reservation_efficiency=1.0,
                     overflow_rate=0.0, preemptions=0, migrated_bytes=0, swapped_bytes=0, num_swaps=0, kv_read_bytes=0,
                     runs_per_request=1.0,
                     num_steps=10, capacity_tokens=100)


def _fake(knee: float, calls: list[float]):
    """p99 TTFT grows with the rate scale and crosses 1.0 s at ``knee``."""
    def run(scale: float) -> ReplayResult:
        calls.append(scale)
        return replace(_BASE, ttft_p99_s=scale / knee, tpot_p99_s=0.01)
    return run


@pytest.mark.parametrize("knee", [0.013, 0.3, 1.7, 9.0])
def test_bisection_brackets_the_knee_within_the_budget(knee: float) -> None:
    calls: list[float] = []
    g = find_goodput(_fake(knee, calls), base_rps=2.0, slo_ttft_s=1.0, slo_tpot_s=0.1, max_runs=8)
    assert len(calls) <= 8 and len(g.probes) == len(calls)
    assert g.bounded and g.rate_scale is not None
    assert g.rate_scale <= knee
    failing = min(p.rate_scale for p in g.probes if not p.meets_slo)
    assert failing > knee
    assert g.goodput_rps == pytest.approx(2.0 * g.rate_scale)
    if knee >= 0.3:  # a knee within 4^2 of the start is found to within 10%
        assert g.rate_scale > 0.9 * knee


def test_first_probe_is_reused_and_unmet_slo_gives_zero() -> None:
    calls: list[float] = []
    first = replace(_BASE, ttft_p99_s=50.0, tpot_p99_s=0.01)
    g = find_goodput(lambda s: calls.append(s) or replace(_BASE, ttft_p99_s=50.0, tpot_p99_s=0.01), 1.0, 1.0, 0.1,
                     start_scale=2.0, first=first, max_runs=3)
    assert calls == [0.5, 0.125]  # the start scale was not replayed again
    assert g.goodput_rps == 0.0 and g.rate_scale is None


def test_lost_or_slow_tpot_misses() -> None:
    assert meets_slo(replace(_BASE, ttft_p99_s=0.1, tpot_p99_s=0.05), 1.0, 0.1)
    assert not meets_slo(replace(_BASE, ttft_p99_s=0.1, tpot_p99_s=0.5), 1.0, 0.1)
    assert not meets_slo(replace(_BASE, ttft_p99_s=0.1, tpot_p99_s=0.05, lost=1), 1.0, 0.1)


def test_bench_reports_goodput(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "g.json"
    rc = main(["bench", "--mode", "online", "--trace", "azure-code", "--max-requests", "60", "--policies", "paged",
               "--slo-ttft-s", "5", "--slo-tpot-s", "0.5", "--goodput-runs", "3", "--no-progress",
               "--json", str(out)])
    assert rc == 0
    assert "goodput_rps" in capsys.readouterr().out
    row = json.loads(out.read_text())["results"][0]
    assert {"goodput_rps", "goodput_rate_scale", "goodput_probes", "ttft_p99_s"} <= set(row)
    assert len(row["goodput_probes"]) <= 3 and row["goodput_probes"][0]["rate_scale"] == 1.0


def test_slo_needs_online_and_both_limits(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--slo-ttft-s", "1", "--slo-tpot-s", "0.1", "--no-progress"]) == 2
    assert main(["bench", "--mode", "online", "--slo-ttft-s", "1", "--no-progress"]) == 2
    assert "--slo-tpot-s" in capsys.readouterr().err
