"""Device backends, one file each, imported lazily. ``get_backend`` picks one by name.

``auto`` prefers mlu, then cuda, then cpu.
"""

from __future__ import annotations

from odma_mlu.backends.base import Backend, MemoryInfo, Timer
from odma_mlu.errors import BackendUnavailable, ConfigError

BACKEND_NAMES = ("auto", "mlu", "cuda", "cpu", "emulated")

__all__ = ["Backend", "MemoryInfo", "Timer", "get_backend", "BACKEND_NAMES"]


def _real_backend(name: str) -> Backend:
    if name == "cpu":
        from odma_mlu.backends.cpu import CpuBackend

        return CpuBackend()
    if name == "cuda":
        from odma_mlu.backends.cuda import CudaBackend

        return CudaBackend()
    if name == "mlu":
        from odma_mlu.backends.mlu import MluBackend

        return MluBackend()
    if name == "auto":
        from odma_mlu.backends.cuda import CudaBackend
        from odma_mlu.backends.mlu import MluBackend

        for cls in (MluBackend, CudaBackend):
            if cls.is_available():
                return cls()
        return _real_backend("cpu")
    raise ConfigError(f"unknown backend {name!r}; choose one of {list(BACKEND_NAMES)}")


def get_backend(name: str = "auto", profile: str | None = None, host: str = "auto", pace: bool = False,
                target_model: str | None = None) -> Backend:
    """Return the backend ``name``.

    ``emulated`` needs ``profile`` (a name in device_profiles/ or a YAML path) and runs its
    tensors on ``host`` (cuda if available under auto, else cpu); its clock and KV capacity
    are those of ``target_model`` (a shape name or config.json; None: the 7B shape) on that
    profile, and ``pace`` makes steps take the card's time.
    """
    if name not in BACKEND_NAMES:
        raise ConfigError(f"unknown backend {name!r}; choose one of {list(BACKEND_NAMES)}")
    if name != "emulated":
        if target_model is not None:
            raise ConfigError(f"emulated_target = {target_model!r} applies to backend 'emulated' only, not {name!r}")
        return _real_backend(name)
    if profile is None:
        raise ConfigError("backend 'emulated' needs a device profile (e.g. --profile mlu370-x4)")
    from odma_mlu.backends.emulated import EmulatedBackend

    if host == "auto":
        from odma_mlu.backends.cuda import CudaBackend

        host = "cuda" if CudaBackend.is_available() else "cpu"
    if host in ("emulated", "mlu"):
        raise ConfigError(f"emulated backend host must be cpu or cuda, not {host!r}")
    return EmulatedBackend(profile, _real_backend(host), target_model=target_model, pace=pace)


def backend_unavailable_message(name: str) -> str | None:
    """The reason ``name`` cannot run here, or None if it can (for CLI pre-checks)."""
    try:
        get_backend(name) if name != "emulated" else None
    except BackendUnavailable as e:
        return str(e)
    return None
