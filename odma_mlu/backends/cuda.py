"""The CUDA backend (NVIDIA GPUs)."""

from __future__ import annotations

import torch

from odma_mlu.backends.base import Backend, DeviceGraph, EventTimer, MemoryInfo, Timer, _TorchGraph
from odma_mlu.errors import BackendUnavailable


class CudaBackend(Backend):
    name = "cuda"
    dist_backend = "nccl"

    def __init__(self, index: int = 0) -> None:
        if not self.is_available():
            raise BackendUnavailable("backend 'cuda' requested but torch.cuda.is_available() is False: this torch "
                                     f"build ({torch.__version__}) has no CUDA or no GPU is visible; "
                                     "use --backend cpu or emulated, or install a CUDA build of torch")
        self._device = torch.device("cuda", index)

    @property
    def device(self) -> torch.device:
        return self._device

    @classmethod
    def is_available(cls) -> bool:
        return bool(torch.cuda.is_available())

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            return bool(torch.cuda.is_bf16_supported())
        return dtype in (torch.float32, torch.float16)

    def mem_get_info(self) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self._device)
        return MemoryInfo(free_bytes=int(free), total_bytes=int(total))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self._device)

    def timer(self) -> Timer:
        return EventTimer(torch.cuda)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def new_graph(self, share_pool_with: DeviceGraph | None = None) -> DeviceGraph | None:
        pool = share_pool_with.pool if isinstance(share_pool_with, _TorchGraph) else None
        return _TorchGraph(torch.cuda, torch.cuda.CUDAGraph, torch.cuda.graph, pool)

    def describe(self) -> str:
        return f"cuda ({torch.cuda.get_device_name(self._device)})"
