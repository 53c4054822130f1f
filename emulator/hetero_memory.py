"""Shape-only KV memory for models with full and sliding-window layers: the shape
(``HeteroShape``, ``load_shape``) and ``HeteroMemory``, the interface of the paged baselines
(emulator/hetero_paged.py) that ``odma-mlu bench`` runs as KV policies through
emulator/hetero_policy.py.

A scheme draws from one byte budget and answers ``admit`` (prompt KV, under a free-memory
watermark), ``grow`` (room for more tokens), ``release``, the bytes held, and the
runs a decode reads in the full and in the sliding layers. ODMA's side is the engine's own
layout (odma_mlu/kvcache/window.py), which emulator/replay.py replays; it is not a scheme here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from odma_mlu.config import BUILTIN_MODEL_SHAPES, ModelSpec, load_model_spec
from odma_mlu.models.layer_types import layer_windows
from odma_mlu.predictor.base import LengthPrediction

PAGE_TOKENS = 16


@dataclass(frozen=True)
class HeteroShape:
    spec: ModelSpec
    windows: tuple[int | None, ...]

    @property
    def num_full(self) -> int:
        return sum(w is None for w in self.windows)

    @property
    def num_sliding(self) -> int:
        return len(self.windows) - self.num_full

    @property
    def window_tokens(self) -> int:
        return next(w for w in self.windows if w is not None)

    @property
    def layer_token_bytes(self) -> int:
        return self.spec.kv_bytes_per_token_per_layer


def load_shape(name_or_path: str) -> HeteroShape:
    """A built-in shape (odma_mlu/models/shapes) or config.json, with its per-layer windows."""
    spec = load_model_spec(name_or_path)
    if name_or_path in BUILTIN_MODEL_SHAPES:
        text = resources.files("odma_mlu.models").joinpath("shapes").joinpath(
            BUILTIN_MODEL_SHAPES[name_or_path]).read_text()
    else:
        path = Path(name_or_path)
        text = (path / "config.json" if path.is_dir() else path).read_text()
    windows = layer_windows(json.loads(text), name_or_path)
    if all(w is None for w in windows) or all(w is not None for w in windows):
        raise ValueError(f"{name_or_path}: needs both full and sliding-window layers")
    return HeteroShape(spec, windows)


@dataclass
class HeteroMemory:
    """Base: what ``HeteroSchemePolicy`` (emulator/hetero_policy.py) calls. Token counts are
    KV tokens of the request; ``tokens`` holds every admitted request's."""

    shape: HeteroShape
    budget_bytes: int
    watermark_fraction: float
    name: str = "abstract"
    tokens: dict[str, int] = field(default_factory=dict)

    def admit(self, rid: str, num_tokens: int, prompt_tokens: int, max_new_tokens: int,
              prediction: LengthPrediction | None) -> bool: ...

    def grow(self, rid: str, num_tokens: int) -> bool: ...

    def release(self, rid: str, generated_tokens: int | None) -> None: ...

    def held_bytes(self) -> int: ...

    def read_runs(self, rid: str, num_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(full-layer runs, sliding-layer runs) in tokens of the decode read of ``num_tokens``."""
        ...

    def check_integrity(self) -> None: ...


def _paged_runs(tokens: int, page: int = PAGE_TOKENS) -> tuple[int, ...]:
    full, rest = divmod(tokens, page)
    return (page,) * full + ((rest,) if rest else ())
