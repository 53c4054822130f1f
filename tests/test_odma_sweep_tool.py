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
    out = tmp_path / "sweep.json"
    assert sweep.main(["--trace", "servegen-r1", "--max-requests", "12", "--max-new-tokens", "2048",
                       "--only", "num_buckets,compact", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["field"], r["value"]) for r in rows] == [
        ("(default)", None), ("num_buckets", 2), ("num_buckets", 4), ("num_buckets", 16), ("compact", False)]
    assert rows[0]["tps_vs_default"] == 1.0
    for r in rows:
        assert r["lost"] == 0
        assert r["tps_vs_default"] == pytest.approx(r["tps"] / rows[0]["tps"])
    assert "(default)" in capsys.readouterr().out


def test_an_unknown_field_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        sweep.main(["--only", "num_buckets,no_such_field"])
    assert e.value.code == 2
    assert "no_such_field" in capsys.readouterr().err
