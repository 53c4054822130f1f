"""What every request handler of the server shares (``ServerState``): the engine thread's
front (``AsyncEngine``), metrics, tokenizer and its thread pool, limits, and drain."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.server.async_engine import AsyncEngine
from odma_mlu.server.metrics import ServerMetrics
from odma_mlu.server.settings import ServeSettings

log = logging.getLogger("odma_mlu.server")

T = TypeVar("T")
RETRY_AFTER_S = 1
TOKENIZER_THREADS = 2


class ServerState:
    """Everything the handlers share; created once per app."""

    def __init__(self, engine: LLMEngine, settings: ServeSettings, tokenizer: Any, model_name: str) -> None:
        self.settings = settings
        self.tokenizer = tokenizer  # handler copy, used on the tokenizer pool; the engine keeps its own
        self.model_name = model_name
        self.context_tokens = engine.spec.max_position_embeddings
        self.max_new_tokens = engine.scheduler.config.max_new_tokens
        self.vocab_size = engine.spec.vocab_size
        self.engine = AsyncEngine(engine, max_waiting=settings.server.max_waiting_requests)
        self.metrics = ServerMetrics(lambda: self.engine.snapshot, engine.policy.name, model_name)
        self.engine._on_finish = self.metrics.on_finish
        self.engine._on_token_gap = self.metrics.on_token_gap
        self.reasoning_parser = settings.server.reasoning_parser
        template = getattr(tokenizer, "chat_template", None)
        self.template_uses_name = isinstance(template, str) and "name" in template.replace("m['role']", "")
        added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
        self.special_strings = tuple(sorted(added, key=len, reverse=True))
        self.pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="odma-tokenize")
        self.draining = False
        self._drain_task: asyncio.Task | None = None
        self.created = int(time.time())

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """Run CPU-heavy work (tokenization, templating) on the tokenizer pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    def begin_drain(self, timeout_s: float) -> None:
        """Refuse new requests; fail what is still running after ``timeout_s``. Idempotent."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d requests in flight, up to %.1f s", self.engine.inflight, timeout_s)

        async def deadline() -> None:
            if not await self.engine.drain(timeout_s):
                log.warning("drain timeout of %.1f s exceeded: failing %d requests", timeout_s, self.engine.inflight)
                self.engine.fail_all(f"the server is shutting down: the drain timeout of {timeout_s:g} s was "
                                     "exceeded; retry on another replica", 503)

        self._drain_task = asyncio.get_running_loop().create_task(deadline())
