"""Backend selection and its error paths: each failure is a clear OdmaError, never a raw ImportError."""

from __future__ import annotations

import sys

import pytest
import torch

from odma_mlu.backends import Backend, MemoryInfo, get_backend
from odma_mlu.backends import backend_unavailable_message
from odma_mlu.backends.cuda import CudaBackend
from odma_mlu.backends.emulated import EmulatedBackend
from odma_mlu.errors import BackendUnavailable, ConfigError


def test_cpu_backend_basics() -> None:
    b = get_backend("cpu")
    assert b.name == "cpu" and b.device.type == "cpu"
    info = b.mem_get_info()
    assert isinstance(info, MemoryInfo) and 0 < info.free_bytes <= info.total_bytes
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        b.check_dtype(dt)
    t = b.timer()
    t.start()
    assert t.stop() >= 0.0


def test_auto_picks_a_working_backend() -> None:
    b = get_backend("auto")
    assert b.name in ("mlu", "cuda", "cpu")


@pytest.mark.parametrize("name", ["gpu", "MLU", "", "npu"])
def test_unknown_backend_name(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        get_backend(name)
    msg = str(info.value)
    assert f"unknown backend {name!r}" in msg
    for valid in ("auto", "mlu", "cuda", "cpu", "emulated"):
        assert valid in msg


def test_mlu_without_torch_mlu(monkeypatch: pytest.MonkeyPatch) -> None:
    # sys.modules[name] = None makes `import torch_mlu` raise ImportError, even where it is installed.
    monkeypatch.setitem(sys.modules, "torch_mlu", None)
    with pytest.raises(BackendUnavailable) as info:
        get_backend("mlu")
    err = info.value
    assert not isinstance(err, ImportError)
    assert err.__cause__ is None and err.__suppress_context__, "the ImportError must not be chained"
    msg = str(err)
    assert "torch_mlu" in msg and "Cambricon's PyTorch container" in msg
    assert "byted-torch-mlu" in msg  # warns off the empty PyPI placeholder
    assert "--backend cpu" in msg


def test_mlu_unavailable_message_for_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_mlu", None)
    msg = backend_unavailable_message("mlu")
    assert msg is not None and "Cambricon's PyTorch container" in msg
    assert backend_unavailable_message("cpu") is None


def test_mlu_is_available_false_without_torch_mlu(monkeypatch: pytest.MonkeyPatch) -> None:
    from odma_mlu.backends.mlu import MluBackend

    monkeypatch.setitem(sys.modules, "torch_mlu", None)
    assert MluBackend.is_available() is False


@pytest.mark.skipif(CudaBackend.is_available(), reason="a CUDA device is present")
def test_cuda_when_unavailable() -> None:
    with pytest.raises(BackendUnavailable) as info:
        get_backend("cuda")
    msg = str(info.value)
    assert "torch.cuda.is_available() is False" in msg and torch.__version__ in msg
    assert "--backend cpu" in msg


@pytest.mark.cuda
@pytest.mark.skipif(not CudaBackend.is_available(), reason="no CUDA device")
def test_cuda_backend_runs() -> None:
    b = get_backend("cuda")
    x = torch.ones(1024, device=b.device)
    t = b.timer()
    t.start()
    x.add_(1)
    assert t.stop() >= 0.0


def test_emulated_without_profile() -> None:
    with pytest.raises(ConfigError, match="backend 'emulated' needs a device profile.*--profile"):
        get_backend("emulated")


def test_emulated_bad_host() -> None:
    with pytest.raises(ConfigError, match="host must be cpu or cuda, not 'mlu'"):
        get_backend("emulated", profile="mlu370-x4", host="mlu")


def test_emulated_unknown_profile() -> None:
    from odma_mlu.errors import ProfileError

    with pytest.raises(ProfileError, match="unknown device profile 'nope'"):
        get_backend("emulated", profile="nope", host="cpu")


def test_emulated_backend_capacity_and_clock() -> None:
    b = get_backend("emulated", profile="mlu370-x4", host="cpu")
    assert isinstance(b, EmulatedBackend)
    assert b.mem_get_info().total_bytes == 23308 * 1024**2
    b.note_allocation(1024**3)
    assert b.mem_get_info().free_bytes == 23308 * 1024**2 - 1024**3
    t = b.timer()
    t.start()
    b.advance(0.25)
    assert t.stop() == pytest.approx(0.25)
    with pytest.raises(AssertionError, match="cannot go back"):
        b.advance(-1.0)
    assert "mlu370-x4" in b.describe()


def test_unsupported_dtype_via_check_dtype() -> None:
    # MLU370 has no bf16, so its emulation refuses it like the real card would.
    b = get_backend("emulated", profile="mlu370-x4", host="cpu")
    b.check_dtype(torch.float16)
    with pytest.raises(BackendUnavailable) as info:
        b.check_dtype(torch.bfloat16)
    msg = str(info.value)
    assert "'emulated' does not support bfloat16" in msg
    assert "float16" in msg and "float32" in msg


class _Fp32Only(Backend):
    name = "fp32only"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def is_available(cls) -> bool:
        return True

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype == torch.float32

    def mem_get_info(self) -> MemoryInfo:
        return MemoryInfo(1, 1)


def test_check_dtype_lists_supported_dtypes() -> None:
    with pytest.raises(BackendUnavailable, match=r"'fp32only' does not support float16; use one of \['float32'\]"):
        _Fp32Only().check_dtype(torch.float16)


def test_event_timer_reads_the_device_events() -> None:
    """The CUDA and MLU backends time with ``EventTimer`` over their device module's
    ``Event``; a stand-in module's events give the elapsed time they report."""
    from odma_mlu.backends.base import EventTimer

    class _Event:
        clock_ms = 0.0

        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.at_ms: float | None = None
            self.synchronized = False

        def record(self) -> None:
            self.at_ms = _Event.clock_ms

        def synchronize(self) -> None:
            self.synchronized = True

        def elapsed_time(self, end: "_Event") -> float:
            assert end.synchronized, "the end event must be waited on before reading the time"
            assert self.at_ms is not None and end.at_ms is not None
            return end.at_ms - self.at_ms

    class _Module:
        Event = _Event

    t = EventTimer(_Module)
    _Event.clock_ms = 10.0
    t.start()
    _Event.clock_ms = 260.0
    assert t.stop() == pytest.approx(0.25)
