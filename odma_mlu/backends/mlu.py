"""The MLU backend (Cambricon MLU370 / MLU590) through torch_mlu, imported lazily.

torch_mlu is not on PyPI: it ships inside Cambricon's PyTorch container image, paired with
one torch release. Importing it registers device ``"mlu"`` and the module ``torch.mlu``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from odma_mlu.backends.base import Backend, EventTimer, MemoryInfo, Timer
from odma_mlu.errors import BackendUnavailable

INSTALL_HINT = ("torch_mlu is not installed. It is not on PyPI (the package 'byted-torch-mlu' is an empty "
                "placeholder): run inside Cambricon's PyTorch container image, which ships torch and torch_mlu "
                "as a matched pair, or use --backend cpu / cuda / emulated.")


def _import_torch_mlu() -> Any:
    try:
        return importlib.import_module("torch_mlu")
    except ImportError as e:
        raise BackendUnavailable(f"backend 'mlu' requested but {INSTALL_HINT} (import said: {e})") from None


def _torch_mlu_module() -> Any:
    _import_torch_mlu()
    mod = getattr(torch, "mlu", None)
    if mod is None:
        raise BackendUnavailable("torch_mlu imported but torch.mlu is missing: the torch and torch_mlu versions "
                                 "do not match; use the pair shipped in one Cambricon container image")
    return mod


class MluBackend(Backend):
    name = "mlu"
    dist_backend = "cncl"

    def __init__(self, index: int = 0) -> None:
        self._mlu = _torch_mlu_module()
        if not self._mlu.is_available():
            raise BackendUnavailable("torch_mlu is installed but no MLU device is visible: check the cards with "
                                     "`cnmon` and MLU_VISIBLE_DEVICES")
        self._device = torch.device("mlu", index)

    @property
    def device(self) -> torch.device:
        return self._device

    @classmethod
    def is_available(cls) -> bool:
        try:
            return bool(_torch_mlu_module().is_available())
        except BackendUnavailable:
            return False

    def compute_capability(self) -> tuple[int, int]:
        props = self._mlu.get_device_properties(self._device)
        return int(getattr(props, "major", 3)), int(getattr(props, "minor", 0))

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            # MLU370 (compute capability 3.x) has no bf16; MLU590 (5.0) does.
            return self.compute_capability()[0] >= 5
        return dtype in (torch.float32, torch.float16)

    def mem_get_info(self) -> MemoryInfo:
        free, total = self._mlu.mem_get_info(self._device)
        return MemoryInfo(free_bytes=int(free), total_bytes=int(total))

    def synchronize(self) -> None:
        self._mlu.synchronize()

    def timer(self) -> Timer:
        return EventTimer(self._mlu)

    def empty_cache(self) -> None:
        self._mlu.empty_cache()

    def new_graph(self, share_pool_with: Any = None) -> Any:
        """``torch.mlu.MLUGraph`` where this torch_mlu has it (vllm-mlu captures decode with it);
        None otherwise (the engine then runs eagerly)."""
        from odma_mlu.backends.base import _TorchGraph

        graph_cls, graph_ctx = getattr(self._mlu, "MLUGraph", None), getattr(self._mlu, "graph", None)
        if graph_cls is None or graph_ctx is None:
            return None
        pool = share_pool_with.pool if isinstance(share_pool_with, _TorchGraph) else None
        return _TorchGraph(self._mlu, graph_cls, graph_ctx, pool)
