"""``odma-mlu serve``: settings -> engine -> FastAPI app -> uvicorn.

uvicorn installs the SIGTERM/SIGINT handlers: on a signal it stops accepting connections
and the app starts draining (``ServerState.begin_drain``): new requests on open connections
get 503, in-flight requests (streams included) have ``server.drain_timeout_s`` to finish,
and at that deadline the ones left get a 503 / an error event and ``[DONE]``. Then the app's
shutdown stops the engine thread and the process exits 0.

If the engine thread dies (``engine.step()`` raised), ``/health`` answers 503 at once and the
server shuts down and exits with status 1, so ``Restart=on-failure`` (systemd) or a container
restart policy brings up a fresh process.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import asyncio
import signal
from types import FrameType
from typing import Any

from odma_mlu.server.settings import API_KEY_ENV, build_engine, settings_from_args

log = logging.getLogger("odma_mlu.server")


EXIT_ENGINE_DIED = 1
DRAIN_GRACE_S = 5.0
"""uvicorn's own graceful-shutdown limit is the drain timeout plus this: the app fails
leftover requests at the drain deadline and needs a moment to write those answers."""


def _server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """Starts the app's drain on SIGTERM/SIGINT. uvicorn re-raises a captured SIGTERM
        after its graceful shutdown, so the process would die by the signal; a completed
        drain is a clean stop, so exit 0 instead."""

        on_exit_signal: Any = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            if self.on_exit_signal is not None:
                self.on_exit_signal()
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return DrainingServer


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_main(ns: argparse.Namespace) -> int:
    import uvicorn

    from odma_mlu.server.app import create_app

    settings = settings_from_args(ns)
    level = settings.server.log_level.upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(settings.host):
        log.warning("binding %s: reachable from other hosts%s", settings.host,
                    "" if settings.api_key else f"; no API key is set (--api-key or {API_KEY_ENV})")
    engine = build_engine(settings)
    app = create_app(engine, settings)
    state = app.state.odma
    drain_s = settings.server.drain_timeout_s
    # A float limit: int() would turn 0.5 into 0 and uvicorn reads 0 / None as "forever".
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.server.log_level,
                            timeout_graceful_shutdown=drain_s + DRAIN_GRACE_S,  # type: ignore[arg-type]
                            access_log=False, server_header=False)
    server = _server_class()(config)

    def drain() -> None:  # in the signal handler, on the event loop's thread
        try:
            asyncio.get_running_loop().call_soon(state.begin_drain, drain_s)
        except RuntimeError:  # no loop running yet: startup; uvicorn just exits
            pass

    def engine_died() -> None:  # on the event loop
        log.critical("the engine thread died: shutting down with exit status %d", EXIT_ENGINE_DIED)
        server.should_exit = True

    server.on_exit_signal = drain
    state.engine.on_fatal = engine_died
    server.run()
    if state.engine.dead:
        log.error("server stopped after an engine failure; exiting with status %d", EXIT_ENGINE_DIED)
        return EXIT_ENGINE_DIED
    log.info("server stopped")
    return 0
