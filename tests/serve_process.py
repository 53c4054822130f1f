"""Start ``odma-mlu serve`` as a child process on a free loopback port and wait for /health.

Tests that need the real process (signals, an external load generator) share this; each
keeps its own ``try/finally`` to stop the process its own way."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def start_server(config: str | Path, cwd: Path, ready_timeout_s: float = 120.0) -> tuple[subprocess.Popen[bytes], str]:
    """(process, base URL) of a server started with ``--config config`` in ``cwd``, once it
    answers /health with 200. ODMA_API_KEY is removed from its environment. The process is
    killed if it exits or is not ready within ``ready_timeout_s``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "ODMA_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "odma_mlu.cli", "serve", "--config", str(config), "--port",
                             str(port)], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            assert proc.poll() is None, "server exited"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not ready within {ready_timeout_s} s"
            time.sleep(0.2)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
