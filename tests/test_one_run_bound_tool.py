"""tools/one_run_bound.py: the two one-run utilization bounds, on known lengths and a real trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tool_module import load_tool


def test_bounds_on_known_lengths() -> None:
    tool = load_tool("one_run_bound")
    # No prompt: live j against G - j left, summed over a life: exactly a half.
    assert tool.free_growth_bound([(0, 100)] * 5) == pytest.approx(0.5)
    # A long prompt is live the whole life and never grows: the bound approaches 1.
    assert tool.free_growth_bound([(10_000, 10)]) > 0.999
    # Equal remainders alternate with nothing shorter: half the batch bounds every gap.
    lengths = [(0, 1)] * 4  # one step each: j = 0, live 0, remaining 1
    assert tool.nested_bound(lengths, num_running=4, draws=3, seed=0) == 0.0


def test_the_tool_reports_both_bounds_for_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool("one_run_bound")
    out = tmp_path / "bound.json"
    assert tool.main(["--trace", "alpaca-vicuna", "--max-requests", "500", "--draws", "20", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    # Nesting needs at most the free memory of keeping all growth free, so it bounds higher.
    assert 0.3 < rows["free_growth"] <= rows["nested"] < 1.0
    assert "kv_utilization <=" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool.main(["--running", "1"])
