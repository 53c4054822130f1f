"""AsyncEngine: the synchronous LLMEngine behind asyncio, owned by exactly one thread.

The engine, its scheduler, KV policy and tokenizer are not thread-safe, and a model step
blocks for milliseconds to seconds, so it can run neither on the event loop nor from
several threads. One daemon thread owns the engine outright::

    event loop (HTTP handlers)                      engine thread
    submit()  --("add", ...)-->  queue.Queue  -->   engine.add_request / abort / call(fn)
    stream.queue  <--call_soon_threadsafe--------   engine.step() outputs, Accepted, Failed

Every engine method is called from that thread only; the event loop sees the engine solely
through per-request ``asyncio.Queue``s and an immutable ``EngineSnapshot`` the thread
publishes after each iteration (one reference assignment: atomic under the GIL).

Failure tiers: a request the engine refuses gets ``Failed(rejected=True, status=400)``; a
request that fails inside a step (``finish_reason == "error"``) gets ``Failed(status=500)``
alone while the others go on; if ``engine.step()`` itself raises, the engine is broken:
every request fails with 503, ``dead`` is set (``/health`` answers 503), the thread ends
and ``on_fatal`` asks the server to exit non-zero so a supervisor restarts the process.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from odma_mlu.engine.llm_engine import LLMEngine, RequestOutput
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.errors import RequestRejected

log = logging.getLogger("odma_mlu.server")

IDLE_POLL_S = 0.2


@dataclass(frozen=True)
class Accepted:
    """The engine queued the request (validation passed; no KV reserved yet)."""


@dataclass(frozen=True)
class Failed:
    """The engine refused the request (``rejected``: bad input, 400) or broke (500/503)."""

    message: str
    rejected: bool = False
    status: int = 500


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine state for /metrics and back-pressure, published by the engine thread."""

    running: int = 0
    waiting: int = 0
    capacity_tokens: int = 0
    live_kv_tokens: int = 0
    reserved_tokens: int = 0
    live_requests: int = 0
    overflows: int = 0
    migrations: int = 0
    migrated_tokens: int = 0
    preemptions: int = 0
    swapped_preemptions: int = 0
    swapped_tokens: int = 0
    swap_used_tokens: int = 0
    bucket_edges_tokens: tuple[int, ...] = ()
    safety_pool_used_tokens: float = 0.0
    safety_pool_tokens: float = 0.0
    hold_ahead_tokens: float = 0.0
    moved_runs: float = 0.0
    steps: int = 0
    sum_live_tokens: int = 0
    sum_reserved_tokens: int = 0
    saturated_steps: int = 0
    sum_util_saturated: float = 0.0
    sum_util_all: float = 0.0
    generated_tokens: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_blocks: int = 0

    @property
    def kv_utilization_now(self) -> float:
        return self.live_kv_tokens / self.capacity_tokens if self.capacity_tokens else 0.0

    @property
    def reservation_efficiency(self) -> float:
        """DESIGN.md: sum of live tokens / sum of reserved tokens, over steps."""
        return self.sum_live_tokens / self.sum_reserved_tokens if self.sum_reserved_tokens else 0.0


@dataclass
class RequestStream:
    """The event-loop side of one request: engine items arrive on ``queue``."""

    request_id: str
    arrival: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    released: bool = False


@dataclass
class _Timing:
    arrival: float
    first_token: float | None = None
    last_token: float = 0.0


class AsyncEngine:
    """Runs ``engine`` in one background thread; see the module docstring."""

    def __init__(self, engine: LLMEngine, *, max_waiting: int,
                 on_finish: Callable[[str | None, float, float | None, float | None, int], None] | None = None,
                 ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._on_finish = on_finish  # (finish_reason, e2e_s, ttft_s, tpot_s, tokens): metrics hook
        self._on_token_gap: Callable[[float], None] | None = None  # inter-token latency hook
        self.on_fatal: Callable[[], None] | None = None  # called on the event loop if the engine dies
        self.dead = False
        self._cmds: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._inflight = 0  # event-loop owned: submitted and not yet released
        self.snapshot = EngineSnapshot(capacity_tokens=engine.policy.capacity_tokens)
        # Engine-thread-only state:
        self._streams: dict[str, RequestStream] = {}
        self._timing: dict[str, _Timing] = {}
        self._acc = dict(steps=0, sum_live=0, sum_reserved=0, sat=0, util_sat=0.0, util_all=0.0, generated=0)
        self.healthy = True

    # -- lifecycle (event loop) -----------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="odma-engine", daemon=True)
        self._thread.start()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted request is released (True) or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._inflight == 0

    async def stop(self) -> None:
        """Stop the thread; requests still running get a 503-style failure."""
        if self._thread is None:
            return
        self._cmds.put(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self._thread = None

    # -- requests (event loop) ------------------------------------------------------------
    def waiting_estimate(self) -> int:
        """Submitted requests not yet running: the back-pressure measure."""
        return max(0, self._inflight - self.snapshot.running)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str,
               prompt_text: str | None = None) -> RequestStream:
        """Hand a request to the engine thread; the caller must ``release()`` the stream."""
        assert self._loop is not None, "AsyncEngine.start() was not called"
        stream = RequestStream(request_id, time.perf_counter())
        self._inflight += 1
        self._cmds.put(("add", prompt, params, stream, prompt_text))
        return stream

    def fail_all(self, message: str, status: int = 503) -> None:
        """Fail every request in the engine now (drain deadline): handlers answer them."""
        self._cmds.put(("fail_all", message, status))

    def release(self, stream: RequestStream) -> None:
        """The handler is done with ``stream``: abort it in the engine unless it finished
        (client gone, error), so its KV is freed. Idempotent."""
        if stream.released:
            return
        stream.released = True
        self._inflight -= 1
        if not stream.finished:
            self._cmds.put(("abort", stream.request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps (introspection, tests)."""
        assert self._loop is not None
        fut: asyncio.Future = self._loop.create_future()
        self._cmds.put(("call", fn, fut))
        return await fut

    # -- engine thread --------------------------------------------------------------------
    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed during shutdown: nobody is listening any more
            pass

    def _deliver(self, stream: RequestStream, item: Any) -> None:
        self._post(stream.queue.put_nowait, item)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException:  # noqa: BLE001 - last resort: never leave clients hanging silently
            log.critical("engine thread died; the server will exit so a supervisor restarts it:\n%s",
                         traceback.format_exc())
            self.healthy = False
            self.dead = True
            for stream in self._streams.values():
                self._deliver(stream, Failed("the engine stopped; see the server log", status=503))
            self._streams.clear()
            self._timing.clear()
            if self.on_fatal is not None:
                self._post(self.on_fatal)

    def _loop_forever(self) -> None:
        while True:
            busy = self.engine.has_unfinished()
            try:
                # Idle: block briefly for work. Busy: only take what is queued, then step.
                cmds = [self._cmds.get(timeout=IDLE_POLL_S)] if not busy else []
            except queue.Empty:
                cmds = []
            while True:
                try:
                    cmds.append(self._cmds.get_nowait())
                except queue.Empty:
                    break
            for cmd in cmds:
                if cmd[0] == "stop":
                    self._fail_all("the server is shutting down", 503)
                    self._publish()
                    return
                self._handle(cmd)
            if self.engine.has_unfinished():
                # A step that raises means the engine is broken (request-level failures come
                # back as outputs): _run fails everyone, marks it dead and the server exits.
                outputs = self.engine.step()
                self._account_step()
                for out in outputs:
                    self._on_output(out)
            self._publish()

    def _handle(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "add":
            _, prompt, params, stream, prompt_text = cmd
            try:
                self.engine.add_request(prompt, params, request_id=stream.request_id, prompt_text=prompt_text)
            except RequestRejected as e:
                self._deliver(stream, Failed(str(e), rejected=True, status=400))
                return
            except Exception as e:  # noqa: BLE001 - reported to the client as a 500
                log.error("add_request failed:\n%s", traceback.format_exc())
                self._deliver(stream, Failed(f"internal error: {type(e).__name__}", status=500))
                return
            self._streams[stream.request_id] = stream
            self._timing[stream.request_id] = _Timing(stream.arrival)
            self._deliver(stream, Accepted())
        elif kind == "abort":
            rid = cmd[1]
            if self._streams.pop(rid, None) is not None:
                self.engine.abort(rid)
                self._timing.pop(rid, None)
                if self._on_finish is not None:
                    self._on_finish("abort", 0.0, None, None, 0)
        elif kind == "fail_all":
            self._fail_all(cmd[1], cmd[2])
        elif kind == "call":
            _, fn, fut = cmd
            try:
                result = fn(self.engine)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting coroutine
                # bind now: Python unbinds ``e`` when the except block ends
                self._post(lambda err=e: fut.done() or fut.set_exception(err))
            else:
                self._post(lambda: fut.done() or fut.set_result(result))

    def _on_output(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        now = time.perf_counter()
        timing = self._timing.get(out.request_id)
        if timing is not None and timing.first_token is None:
            timing.first_token = now
        elif timing is not None and out.new_token_ids and self._on_token_gap is not None:
            self._on_token_gap(now - timing.last_token)
        if timing is not None:
            timing.last_token = now
        self._acc["generated"] += len(out.new_token_ids)
        if out.finished:
            self._streams.pop(out.request_id, None)
            self._timing.pop(out.request_id, None)
            if timing is not None and self._on_finish is not None:
                n = len(out.token_ids)
                ttft = (timing.first_token or now) - timing.arrival
                tpot = (now - timing.first_token) / (n - 1) if timing.first_token and n > 1 else None
                self._on_finish(out.finish_reason, now - timing.arrival, ttft, tpot, n)
        if out.error is not None:  # this request failed alone inside a step; its KV is freed
            self._deliver(stream, Failed(f"the request failed in the engine: {out.error}", status=500))
            return
        self._deliver(stream, out)

    def _fail_all(self, message: str, status: int) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            self._deliver(stream, Failed(message, status=status))
        self._streams.clear()
        self._timing.clear()

    def _account_step(self) -> None:
        sched, policy = self.engine.scheduler, self.engine.policy
        live, reserved, cap = sched.live_kv_tokens(), policy.reserved_tokens(), policy.capacity_tokens
        a = self._acc
        a["steps"] += 1
        a["sum_live"] += live
        a["sum_reserved"] += reserved
        util = live / cap if cap else 0.0
        a["util_all"] += util
        if sched.waiting:
            a["sat"] += 1
            a["util_sat"] += util

    def _publish(self) -> None:
        sched, st = self.engine.scheduler, self.engine.policy.stats()
        a = self._acc
        self.snapshot = EngineSnapshot(
            running=len(sched.running), waiting=len(sched.waiting), capacity_tokens=st.capacity_tokens,
            live_kv_tokens=sched.live_kv_tokens(), reserved_tokens=st.reserved_tokens,
            live_requests=st.live_requests, overflows=st.overflowed_requests,
            migrations=getattr(st, "copies", getattr(st, "migrations", 0)),
            migrated_tokens=getattr(st, "copied_tokens", getattr(st, "migrated_tokens", 0)), preemptions=sched.num_preemptions,
            swapped_preemptions=sched.num_swaps, swapped_tokens=sched.swapped_tokens_total,
            swap_used_tokens=sched.swap_used_tokens,
            bucket_edges_tokens=tuple(st.bucket_edges_tokens),
            safety_pool_used_tokens=st.extra.get("safety_pool_used_tokens", 0.0),
            safety_pool_tokens=st.extra.get("safety_pool_tokens", 0.0),
            hold_ahead_tokens=st.extra.get("hold_ahead_tokens", 0.0),
            moved_runs=st.extra.get("moved_runs", 0.0),
            steps=a["steps"], sum_live_tokens=a["sum_live"], sum_reserved_tokens=a["sum_reserved"],
            saturated_steps=a["sat"], sum_util_saturated=a["util_sat"], sum_util_all=a["util_all"],
            generated_tokens=a["generated"], **_prefix_fields(self.engine.policy))


def _prefix_fields(policy: object) -> dict[str, int]:
    """Prefix-cache counters of a policy wrapped by PrefixCachingPolicy (zeros otherwise)."""
    stats = getattr(policy, "prefix_stats", None)
    if stats is None:
        return {}
    st = stats()
    return {"prefix_cache_query_tokens": st.query_tokens, "prefix_cache_hit_tokens": st.hit_tokens,
            "prefix_cache_blocks": st.blocks}
