"""tools/ideal_gap.py: the second ideal pays for its preemptions, and the switch is undone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from odma_mlu.kvcache.paged import IdealPolicy
from tool_module import load_tool


def test_ideal_gap_reports_the_paid_preemption_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool("ideal_gap")
    out = tmp_path / "gap.json"
    # A small card, so requests are preempted and the two ideals differ.
    assert tool.main(["--trace", "alpaca-vicuna", "--max-requests", "300", "--max-new-tokens", "512",
                      "--kv-capacity-tokens", "6000", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert set(rows) == {"odma", "paged", "ideal", "ideal_paid"}
    assert IdealPolicy.free_preemption is True  # the process-wide switch is restored
    # Same schedule and memory model; the bound that pays can only be slower than free preemption.
    assert rows["ideal_paid"]["preemptions"] > 0
    assert rows["ideal_paid"]["tps"] < rows["ideal"]["tps"]
    assert rows["odma"]["tps"] <= rows["ideal"]["tps"] * 1.005
    assert "odma/ideal_paid" in capsys.readouterr().out
