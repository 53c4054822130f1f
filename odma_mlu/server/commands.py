"""``odma-mlu serve``: settings -> engine -> FastAPI app -> uvicorn.

uvicorn installs the SIGTERM/SIGINT handlers: on a signal it stops accepting connections,
lets in-flight requests (streams included) finish for up to ``server.drain_timeout_s``,
then runs the app's shutdown, which stops the engine thread; the process exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
from types import FrameType

from odma_mlu.server.settings import API_KEY_ENV, build_engine, settings_from_args

log = logging.getLogger("odma_mlu.server")


def _server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process
        would die by the signal; a completed drain is a clean stop, so exit 0 instead."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
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
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.server.log_level,
                            timeout_graceful_shutdown=int(settings.server.drain_timeout_s) or None,
                            access_log=False, server_header=False)
    _server_class()(config).run()
    log.info("server stopped")
    return 0
