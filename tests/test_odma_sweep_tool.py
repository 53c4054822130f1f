"""tools/odma_sweep.py: every OdmaConfig field has a row, the default runs once, and each
row is that field alone changed, reported against the default."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from odma_mlu.config import OdmaConfig
from tool_module import load_tool

sweep = load_tool("odma_sweep")


def test_the_grid_covers_every_field_with_valid_values() -> None:
    assert set(sweep.GRID) == {f.name for f in fields(OdmaConfig)}
    default = OdmaConfig()
    for name, values in sweep.GRID.items():
        assert any(v != getattr(default, name) for v in values), f"{name}: no value besides the default"
        for v in values:
            OdmaConfig(**{name: v})  # each value passes the config's own validation


def test_the_default_runs_once_and_each_row_changes_one_field(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert sweep.main(["--trace", "servegen-r1", "--max-requests", "12", "--max-new-tokens", "2048",
                       "--only", "num_buckets,compact", "--json", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Saved sweeps drawn side by side, nothing replayed.
    both = tmp_path / "both.png"
    assert sweep.main(["--from-json", str(out), str(out), "--plot", str(both)]) == 0
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.read_text())["rows"]
    assert [(r["field"], r["value"]) for r in rows] == [
        ("(default)", None), ("num_buckets", 2), ("num_buckets", 4), ("num_buckets", 16), ("compact", False)]
    assert rows[0]["tps_vs_default"] == 1.0
    for r in rows:
        assert r["lost"] == 0
        assert r["tps_vs_default"] == pytest.approx(r["tps"] / rows[0]["tps"])
    assert "(default)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, names", [(["--only", "num_buckets,no_such_field"], "no_such_field"),
                                         (["--from-json", "x.json"], "--plot"),
                                         (["--from-json", "no/such.json", "--plot", "x.png"], "no/such.json")])
def test_usage_errors_name_the_problem(argv: list[str], names: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert e.value.code == 2
    assert names in capsys.readouterr().err
