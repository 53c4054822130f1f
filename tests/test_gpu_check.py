"""tools/gpu_check.sh, the one script a lent GPU runs, checked on CPU (``BACKEND=cpu``: tiny
shapes). Every step must run to its end within its limit and write what it promises; the
emulator's verdict on a CPU is whatever it measures, so only the file is required of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_every_step_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gc"
    env = dict(os.environ, BACKEND="cpu", PY=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    log = (out / "log.txt").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "(time limit)" not in log, log[-3000:]
    # Every step but the emulator's verdict must exit 0.
    failed = [line for line in log.splitlines() if line.startswith("== ") and ": exit " in line]
    assert all("validate-emulator" in line for line in failed), failed
    assert proc.returncode == (1 if failed else 0), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "profile.yaml").stat().st_size > 0 and (out / "profile.png").stat().st_size > 0
    verdict = json.loads((out / "validate_emulator.json").read_text())
    assert verdict["verdict"] in ("PASS", "FAIL") and verdict["cases"]
    rows = json.loads((out / "decode.json").read_text())
    rows = rows["rows"]
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["engine_eager_ms"] > 0 and r["roofline_ms"] > 0 for r in rows)


def test_gpu_check_rejects_an_unknown_backend(tmp_path: Path) -> None:
    env = dict(os.environ, BACKEND="rocm", PY=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path / "x")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "BACKEND=rocm" in proc.stderr and "cuda" in proc.stderr
