"""The Backend interface: the only door to device-specific APIs.

No code outside ``odma_mlu/backends/`` touches ``torch.cuda``, ``torch.mlu`` or
``torch_mlu``; everything else asks a ``Backend``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from odma_mlu.engine.step_work import StepWork
    from odma_mlu.kvcache.odma import RunCost


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
