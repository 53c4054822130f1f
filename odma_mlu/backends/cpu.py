"""The CPU backend: always available; the reference for tests."""

from __future__ import annotations

import psutil
import torch

from odma_mlu.backends.base import Backend, MemoryInfo


class CpuBackend(Backend):
    name = "cpu"
    dist_backend = "gloo"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def is_available(cls) -> bool:
        return True

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype in (torch.float32, torch.float16, torch.bfloat16)

    def mem_get_info(self) -> MemoryInfo:
        vm = psutil.virtual_memory()
        return MemoryInfo(free_bytes=int(vm.available), total_bytes=int(vm.total))
