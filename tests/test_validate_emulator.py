"""``odma-mlu validate-emulator`` runs on a tiny model and writes the documented JSON.

Timing accuracy is not asserted here (a shared CI machine's timings are noise); the
accuracy figure is measured by hand and recorded in docs/engine.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from odma_mlu.cli import main

PROFILE = str(Path(__file__).resolve().parent.parent / "device_profiles" / "cpu-host.yaml")


def test_validate_emulator_writes_cases(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "validate.json"
    rc = main(["validate-emulator", "--model", str(tiny_model_dir), "--profile", PROFILE, "--backend", "cpu",
               "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    cases = doc["cases"]
    assert len(cases) >= 6
    assert {(c["batch"], c["context_tokens"]) for c in cases} >= {(b, c) for b in (1, 4, 16) for c in (64, 256)}
    for c in cases:
        assert {"batch", "context_tokens", "measured_s", "predicted_s"} <= set(c)
        assert c["measured_s"] > 0 and c["predicted_s"] > 0
    errs = sorted(abs(c["predicted_s"] - c["measured_s"]) / c["measured_s"] for c in cases)
    assert doc["median_abs_rel_error"] == pytest.approx(errs[len(errs) // 2] if len(errs) % 2 else
                                                        (errs[len(errs) // 2 - 1] + errs[len(errs) // 2]) / 2)
    assert doc["torch_threads"] == 1  # the profile was measured single-threaded
    printed = capsys.readouterr().out
    assert "median |predicted - measured|" in printed
    assert doc["measured_timer"] == "wall_clock"  # the backend timer unless --timer thread-cpu
    assert all(c["measured_wall_s"] > 0 for c in cases)


def test_validate_emulator_bad_profile(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["validate-emulator", "--model", str(tiny_model_dir), "--profile", str(tmp_path / "nope.yaml"),
               "--backend", "cpu"])
    assert rc == 2
    assert "nope.yaml" in capsys.readouterr().err
