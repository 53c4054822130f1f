"""Run the app under uvicorn in a background thread on a loopback port (tests, load tests).

A real socket, not an in-memory ASGI transport, so client disconnects and concurrent
connections behave as in production. Port 0 lets the OS pick a free port.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Coroutine

import uvicorn
from fastapi import FastAPI


class ThreadedServer:
    """``with ThreadedServer(app) as srv: srv.base_url`` -> ``http://127.0.0.1:<port>``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        self.app = app
        config = uvicorn.Config(app, host=host, port=0, log_level=log_level, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.port = 0

    def start(self, timeout_s: float = 30.0) -> "ThreadedServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run_on_loop(self, make: Callable[[], Coroutine[Any, Any, Any]], timeout_s: float = 30.0) -> Any:
        """Run a coroutine on the server's event loop (e.g. ``AsyncEngine.call``)."""
        loop = self.app.state.odma.engine._loop
        assert loop is not None, "server not started"
        return asyncio.run_coroutine_threadsafe(make(), loop).result(timeout_s)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30.0)

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
