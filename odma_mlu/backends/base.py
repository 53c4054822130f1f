"""The Backend interface: the only door to device-specific APIs.

No code outside ``odma_mlu/backends/`` touches ``torch.cuda``, ``torch.mlu`` or
``torch_mlu``; everything else asks a ``Backend``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from odma_mlu.engine.step_work import StepWork
    from odma_mlu.kvcache.run_pricing import RunCost


@dataclass(frozen=True)
class MemoryInfo:
    free_bytes: int
    total_bytes: int


class Timer(ABC):
    """Measures elapsed device time between ``start()`` and ``stop()`` (seconds)."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> float:
        """Return the seconds since ``start()``, after the device has finished the work."""


class EventTimer(Timer):
    """Device events around the work, for a torch device module with CUDA-style ``Event``
    (``torch.cuda``, ``torch.mlu``): the device's own clock, no host wait in between."""

    def __init__(self, device_module: Any) -> None:
        self._start = device_module.Event(enable_timing=True)
        self._end = device_module.Event(enable_timing=True)

    def start(self) -> None:
        self._start.record()

    def stop(self) -> float:
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3


class WallTimer(Timer):
    """Host wall clock around a synchronize: correct for CPU and as a fallback."""

    def __init__(self, backend: "Backend") -> None:
        self._backend = backend
        self._t0 = 0.0

    def start(self) -> None:
        self._backend.synchronize()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        self._backend.synchronize()
        return time.perf_counter() - self._t0


class DeviceGraph(ABC):
    """A captured sequence of device kernels replayed with one launch (CUDA graphs,
    ``torch.mlu.MLUGraph``). Inputs and outputs are the static tensors used at capture."""

    @abstractmethod
    def capture(self, fn: "Callable[[], torch.Tensor]") -> torch.Tensor:
        """Run ``fn`` under capture (after warm-up runs); returns its static output."""

    @abstractmethod
    def replay(self) -> None: ...


class _TorchGraph(DeviceGraph):
    """The common torch API: ``graph_cls()`` and the ``graph_ctx(g, pool=...)`` context
    (``torch.cuda.CUDAGraph`` / ``torch.cuda.graph``; ``torch.mlu.MLUGraph`` / ``torch.mlu.graph``)."""

    def __init__(self, device_module: Any, graph_cls: Any, graph_ctx: Any, pool: Any = None,
                 warmup_runs: int = 2) -> None:
        self._mod, self._ctx, self._pool, self._warmup = device_module, graph_ctx, pool, warmup_runs
        self._graph = graph_cls()

    def capture(self, fn: "Callable[[], torch.Tensor]") -> torch.Tensor:
        stream = self._mod.Stream()
        stream.wait_stream(self._mod.current_stream())
        with self._mod.stream(stream):  # warm-up off the default stream, as the torch docs ask
            for _ in range(self._warmup):
                fn()
        self._mod.current_stream().wait_stream(stream)
        with self._ctx(self._graph, pool=self._pool):
            out = fn()
        return out

    def replay(self) -> None:
        self._graph.replay()

    @property
    def pool(self) -> Any:
        return self._graph.pool()


class Backend(ABC):
    """A device that runs tensors: its memory, dtypes, synchronization and timing."""

    name: str = "abstract"
    dist_backend: str = "gloo"
    prices_steps: bool = False
    """``account_step`` uses the step's ``StepWork`` (the emulated backend's clock); the
    engine describes steps only where this is set."""

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool: ...

    @abstractmethod
    def supports_dtype(self, dtype: torch.dtype) -> bool: ...

    @abstractmethod
    def mem_get_info(self) -> MemoryInfo: ...

    def synchronize(self) -> None:
        """Wait for queued device work; a no-op for synchronous devices."""

    def timer(self) -> Timer:
        return WallTimer(self)

    def empty_cache(self) -> None:
        """Return cached allocator blocks to the device; a no-op where there is no cache."""

    def describe(self) -> str:
        return f"{self.name} ({self.device})"

    def kv_run_cost(self) -> "RunCost | None":
        """Prices of KV runs and copies for the policies' copy decisions; None where the
        device has no profile (policies then never copy to merge runs)."""
        return None

    def swap_capacity_tokens(self, swap_space_bytes: int, kv_bytes_per_token: int) -> int:
        """KV tokens that ``swap_space_bytes`` of host memory holds for preempted requests
        (0: no swapping), given the arena's ``kv_bytes_per_token``."""
        return swap_space_bytes // kv_bytes_per_token

    def new_graph(self, share_pool_with: "DeviceGraph | None" = None) -> "DeviceGraph | None":
        """A device graph for capturing decode steps, or None where the backend has none
        (CPU, the emulated backend): the engine then runs eagerly. ``share_pool_with``: a
        graph whose memory pool this one reuses (graphs replayed one at a time)."""
        return None

    def account_step(self, work: "StepWork") -> None:
        """Called after every engine step with what it issued; the emulated backend advances
        (and paces) its clock by the step-cost function. A no-op on real devices."""

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise a clear error if ``dtype`` cannot run here."""
        if not self.supports_dtype(dtype):
            from odma_mlu.errors import BackendUnavailable

            ok = [str(d).replace("torch.", "") for d in (torch.float32, torch.float16, torch.bfloat16)
                  if self.supports_dtype(d)]
            raise BackendUnavailable(f"backend {self.name!r} does not support {str(dtype).replace('torch.', '')}; "
                                     f"use one of {ok} (e.g. --dtype float16 on MLU370)")
