"""An existing OpenAI-compatible load generator (guidellm) against the emulator-mode server,
on loopback, bounded in requests and time. Slow, and skipped unless guidellm is found:
it pulls a large dependency tree, so it lives in its own virtual environment::

    python3 -m venv /tmp/lgvenv && /tmp/lgvenv/bin/pip install guidellm
    GUIDELLM=/tmp/lgvenv/bin/guidellm .venv/bin/pytest -q -m slow tests/test_server_loadgen.py -s

docs/serving.md has the figures of a larger run and the command behind them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from odma_mlu.server.metrics import parse_metrics
from serve_process import start_server

ROOT = Path(__file__).resolve().parent.parent
GUIDELLM = os.environ.get("GUIDELLM") or shutil.which("guidellm")
REQUESTS, STREAMS = 64, 16


@pytest.mark.slow
@pytest.mark.skipif(GUIDELLM is None, reason="guidellm not installed (set GUIDELLM=/path/to/guidellm)")
def test_guidellm_against_serve_emulated(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from make_tiny_model import main as make_tiny

    model = tmp_path / "out" / "tiny-qwen2"
    assert make_tiny([str(model)]) == 0
    proc, url = start_server(ROOT / "deploy" / "emulator-cpu.yaml", tmp_path)
    try:
        out = tmp_path / "guidellm.json"
        run = subprocess.run([GUIDELLM, "run", "--backend", f"kind=openai_http,target={url},model=tiny-qwen2",
                              "--profile", f"kind=concurrent,streams={STREAMS}",
                              "--constraint", f"kind=max_requests,count={REQUESTS}",
                              "--constraint", "kind=max_duration,seconds=240",
                              "--data", "kind=synthetic_text,prompt_tokens=128,output_tokens=64",
                              "--tokenizer", f"kind=huggingface_auto,model={model}",
                              "--output", f"kind=json,path={out}", "--disable-console-interactive"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        totals = json.loads(out.read_text())["benchmarks"][0]["metrics"]["request_totals"]
        print("guidellm:", totals)
        assert totals["successful"] == REQUESTS and totals["errored"] == 0 and totals["incomplete"] == 0
        m = parse_metrics(httpx.get(url + "/metrics").text)
        assert m["odma_kv_reserved_tokens"] == 0 and m["odma_requests_running"] == 0
        assert not any(k.startswith("odma_http_errors_total") and v for k, v in m.items())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
