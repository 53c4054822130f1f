"""The emulated backend: real tensors on cpu or cuda, the clock and KV capacity of a
target model shape on a device profile (by default the 7B shape on an MLU370-X4).

A small model computes the tokens; every engine step is priced by the emulator's one
step-cost function *for the target shape* (``account_step``) and advances a virtual clock.
With ``pace=True`` (the emulated server) each step also waits until wall time catches up
with the virtual clock, so clients see the card's TTFT and TPOT, not the host's.

The target's layer kinds (``target_layers``, odma_mlu/models/layer_kinds.py) price a sliding
or hybrid model by kind: ``EmulatedBackend(profile, host, target_model="gemma-3-12b")`` (a
shape name or config.json path) loads the spec and its kinds together; a ``ModelSpec``
without kinds is all full attention. The engine's ``describe_step`` says what its sliding
layers read (each ring) and what its state pool copied, so a small sliding or hybrid model
served here is priced as the matching target shape.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from odma_mlu.backends.base import Backend, MemoryInfo, Timer

if TYPE_CHECKING:
    from odma_mlu.config import ModelSpec
    from odma_mlu.engine.step_work import StepWork
    from odma_mlu.kvcache.run_pricing import RunCost
    from odma_mlu.models.layer_kinds import LayerKinds


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
    prices_steps = True

    def __init__(self, profile: "object", host: Backend, target_model: "ModelSpec | str | None" = None,
                 pace: bool = False, target_layers: "LayerKinds | None" = None) -> None:
        from emulator.cost_model import CostModel
        from emulator.profile import DeviceProfile, load_profile
        from odma_mlu.config import load_model_spec
        from odma_mlu.models.layer_kinds import LayerKinds, load_target_shape

        if isinstance(profile, str):  # a name in device_profiles/ or a YAML path
            profile = load_profile(profile)
        assert isinstance(profile, DeviceProfile), "EmulatedBackend needs a DeviceProfile or a profile name/path"
        self.profile = profile
        self.host = host
        if isinstance(target_model, str):  # a shape name or config.json: spec and layer kinds
            target_model, kinds = load_target_shape(target_model)
            target_layers = target_layers or kinds
        self.target_model = target_model or load_model_spec()
        self.target_layers = target_layers or LayerKinds.all_full(self.target_model)
        self.cost = CostModel(profile, self.target_model, layers=self.target_layers)
        self.clock = VirtualClock()
        self.pace = pace
        self._wall_origin_s: float | None = None
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

    def kv_capacity_tokens(self, activation_reserve_fraction: float = 0.10) -> int:
        """KV tokens the target shape has on the profiled card (memory - weights - reserve),
        counting K/V in its attention layers (full and sliding; a hybrid's states are loans)."""
        m, kinds = self.target_model, self.target_layers
        weight_bytes = kinds.ssm.num_params * m.dtype_bytes if kinds.ssm is not None else m.weight_bytes
        usable = self.profile.capacity_bytes * (1.0 - activation_reserve_fraction) - weight_bytes
        return max(0, int(usable) // (kinds.num_attention * m.kv_bytes_per_token_per_layer))

    def swap_capacity_tokens(self, swap_space_bytes: int, kv_bytes_per_token: int) -> int:
        """In tokens of the target shape (what the clock prices)."""
        return self.cost.swap_capacity_tokens(swap_space_bytes)

    def synchronize(self) -> None:
        self.host.synchronize()

    def timer(self) -> Timer:
        return _VirtualTimer(self.clock)

    def kv_run_cost(self) -> "RunCost":
        return self.cost

    def account_step(self, work: "StepWork") -> None:
        self.advance(self.cost.step_time(work).time_s)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        if not self.pace:
            return
        now = time.perf_counter()
        if self._wall_origin_s is None or now - self._wall_origin_s > self.clock.now_s + 1.0:
            # First step, or the host fell more than a second behind (idle gap, slow host):
            # re-anchor so the card's time is not "caught up" in a burst.
            self._wall_origin_s = now - self.clock.now_s
            return
        wait_s = self._wall_origin_s + self.clock.now_s - now
        if wait_s > 0:
            time.sleep(wait_s)

    def describe(self) -> str:
        return (f"emulated {self.profile.name} ({self.target_model.name} shape, {self.target_layers.describe()})"
                f" on {self.host.describe()}"
                + (", paced" if self.pace else ""))


def profile_run_cost(profile: str, spec: "ModelSpec", layers: "LayerKinds", backend_name: str) -> "RunCost":
    """What ODMA's cost rules need on a real card: the emulator's cost model of ``profile`` (a
    name in device_profiles/ or a YAML path) for this model's shape, as the emulated backend
    prices its own steps. ConfigError when the profile cannot be read or describes another
    kind of device than ``backend_name`` (an MLU profile would misprice a GPU's runs)."""
    from emulator.cost_model import CostModel
    from emulator.profile import load_profile
    from emulator.validate import profile_device_kind
    from odma_mlu.errors import ConfigError

    loaded = load_profile(profile)
    kind = profile_device_kind(loaded)
    if kind and kind != backend_name:
        raise ConfigError(f"profile = {profile!r} is for the {kind} backend, but the engine runs on the "
                          f"{backend_name} backend; name a profile of this device (measure one with "
                          f"`odma-mlu profile-bandwidth --backend {backend_name}`) or leave `profile` unset")
    return CostModel(loaded, spec, layers=layers)
