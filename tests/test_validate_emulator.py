"""``odma-mlu validate-emulator``: cases of every kind, a fixed held-out split, a verdict
that can fail, and a refusal of a profile of another device kind.

Timing accuracy is not asserted here (a shared CI machine's timings are noise); the
accuracy figure is measured by hand and recorded in docs/engine.md.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from emulator.validate import KINDS, case_grid, decode_locations
from odma_mlu.cli import main

PROFILES = Path(__file__).resolve().parent.parent / "device_profiles"
PROFILE = str(PROFILES / "cpu-host.yaml")


def test_split_is_fixed_and_covers_every_kind() -> None:
    grid = case_grid()
    assert grid == case_grid()  # fixed in code, not drawn
    for kind in KINDS:
        mine = [g for g in grid if g[0] == kind]
        assert any(h for *_, h in mine) and any(not h for *_, h in mine), kind
    assert {"decode_one_run", "decode_runs", "decode_paged", "decode_views", "decode_split", "prefill",
            "kv_copy"} == set(KINDS)


def test_layouts_are_what_they_say() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    one, _ = decode_locations("decode_one_run", 4, 257, rng)
    assert all(loc.num_runs == 1 for loc in one)
    assert len({loc.start_slot % 64 for loc in one}) > 1  # uneven starts
    runs, size = decode_locations("decode_runs", 4, 257, rng)
    assert all(loc.num_runs >= 2 and loc.capacity_tokens == 257 for loc in runs)
    assert all(s + n <= size for loc in runs for s, n in loc.runs)
    paged, size = decode_locations("decode_paged", 4, 257, rng)
    for loc in paged:
        assert loc.capacity_tokens == 257 and loc.num_runs > 4
        assert all(s % 16 == 0 for s, _ in loc.runs) and all(s + n <= size for s, n in loc.runs)
    slots = [loc.slot_of(t) for loc in paged for t in range(257)]
    assert len(set(slots)) == len(slots)  # no two tokens share a slot


def test_validate_emulator_writes_cases(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       cpu_host_call_one_launch: Path) -> None:
    """Every kind's cases, at a view length the grid's contexts reach (``cpu_host_call_one_launch``)."""
    out = tmp_path / "validate.json"
    rc = main(["validate-emulator", "--model", str(tiny_model_dir), "--profile", str(cpu_host_call_one_launch),
               "--backend", "cpu",
               "--repeats", "1", "--max-error", "1e9", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    cases = doc["cases"]
    assert {c["kind"] for c in cases} == set(KINDS)
    for c in cases:
        assert {"kind", "batch", "context_tokens", "measured_s", "predicted_s", "held_out"} <= set(c)
        assert c["measured_s"] > 0 and c["predicted_s"] > 0
    rel = [abs(c["predicted_s"] - c["measured_s"]) / c["measured_s"] for c in cases if c["held_out"]]
    assert doc["median_abs_rel_error"] == pytest.approx(statistics.median(rel))
    assert set(doc["median_abs_rel_error_by_kind"]) == set(KINDS)
    assert doc["verdict"] == "PASS"
    assert doc["torch_threads"] == 1  # the profile was measured single-threaded
    paged = [c for c in cases if c["kind"] == "decode_paged"]
    assert all(c["runs_per_sequence"] > 1 for c in paged)
    split = [c for c in cases if c["kind"] == "decode_split"]
    assert any(c["split_reads"] > 0 for c in split), "the split kind was meant to read decodes in parts"
    assert not any(c["split_reads"] for c in cases if c["kind"] != "decode_split")
    views = [c for c in cases if c["kind"] == "decode_views"]
    assert views and all(c["views"] == c["batch"] for c in views), "each sequence there is its own view"
    printed = capsys.readouterr().out
    assert "PASS: held-out median |predicted - measured|" in printed


def test_validate_emulator_can_fail(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["validate-emulator", "--model", str(tiny_model_dir), "--profile", PROFILE, "--backend", "cpu",
               "--repeats", "1", "--max-error", "0"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "FAIL: held-out median" in out
    assert "measured just before" in out and "2026-11-21" in out  # the profile's date, and what to do


def test_validate_emulator_refuses_another_device_kind(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["validate-emulator", "--model", str(tiny_model_dir), "--profile", str(PROFILES / "mlu370-x4.yaml"),
               "--backend", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mlu370-x4" in err and "cpu" in err


def test_validate_emulator_bad_profile(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["validate-emulator", "--model", str(tiny_model_dir), "--profile", str(tmp_path / "nope.yaml"),
               "--backend", "cpu"])
    assert rc == 2
    assert "nope.yaml" in capsys.readouterr().err
