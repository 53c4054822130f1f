"""The emulated backend: real tensors on cpu or cuda, capacity and time of a device profile.

Each engine step calls ``advance(cost_s)`` with the cost model's time for that step, so
timings are deterministic and reproduce the profiled device (e.g. an MLU370-X4) in CI.
"""

from __future__ import annotations

import torch

from odma_mlu.backends.base import Backend, MemoryInfo, Timer


class VirtualClock:
    """Monotone virtual time in seconds."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def advance(self, seconds: float) -> None:
        assert seconds >= 0.0, f"virtual clock cannot go back ({seconds} s)"
        self.now_s += seconds


class _VirtualTimer(Timer):
    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = self._clock.now_s

    def stop(self) -> float:
        return self._clock.now_s - self._t0


class EmulatedBackend(Backend):
    name = "emulated"

    def __init__(self, profile: "object", host: Backend) -> None:
        from emulator.profile import DeviceProfile

        assert isinstance(profile, DeviceProfile), "EmulatedBackend needs an emulator.profile.DeviceProfile"
        self.profile = profile
        self.host = host
        self.clock = VirtualClock()
        self.dist_backend = host.dist_backend
        self._allocated_bytes = 0

    @property
    def device(self) -> torch.device:
        return self.host.device

    @classmethod
    def is_available(cls) -> bool:
        return True

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        name = str(dtype).replace("torch.", "")
        return name in self.profile.compute_flops_per_s and self.host.supports_dtype(dtype)

    def mem_get_info(self) -> MemoryInfo:
        total = self.profile.capacity_bytes
        return MemoryInfo(free_bytes=max(0, total - self._allocated_bytes), total_bytes=total)

    def note_allocation(self, num_bytes: int) -> None:
        """Account emulated device memory (the tensors themselves live on the host device)."""
        self._allocated_bytes += num_bytes

    def synchronize(self) -> None:
        self.host.synchronize()

    def timer(self) -> Timer:
        return _VirtualTimer(self.clock)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def describe(self) -> str:
        return f"emulated {self.profile.name} on {self.host.describe()}"
