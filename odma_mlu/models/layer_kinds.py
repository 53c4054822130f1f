"""Which kind each layer of a model is, as the step-cost function prices it.

``ModelSpec`` (odma_mlu/config.py) gives the shape every layer shares (hidden size, heads,
MLP, vocab); ``LayerKinds`` says how its ``num_layers`` split into kinds::

    full attention     KV of every token, read per decode as the policy's runs
    sliding window     KV of the last ``window_tokens`` tokens only (a ring per request);
                       a decode reads at most the window
    SSM (Mamba)        no KV: one fixed state per request (``HybridSpec``), read and written
                       once per decode step; in_proj / out_proj matmuls; a chunked scan per prefill

``CostModel(profile, spec, layers=...)`` (emulator/cost_model.py) takes it; without one,
every layer is full attention (the 7B target shape). Build one from a shape name or a
config.json (``load_layer_kinds``), from per-layer windows (``from_windows``), from a
``HybridSpec`` (``from_hybrid``) or from a loaded forward model (``of_model``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from odma_mlu.config import BUILTIN_MODEL_SHAPES, ModelSpec
from odma_mlu.errors import ConfigError
from odma_mlu.models.hybrid_spec import BUILTIN_HYBRID_SHAPES, HybridSpec, hybrid_spec_from_config
from odma_mlu.models.layer_types import layer_windows

HYBRID_MODEL_TYPES = ("bamba", "granitemoehybrid", "jamba")


@dataclass(frozen=True)
class LayerKinds:
    """Layer counts per kind; ``ssm`` (the hybrid's shape) when there are SSM layers."""

    num_full: int
    num_sliding: int = 0
    window_tokens: int | None = None
    ssm: HybridSpec | None = None

    def __post_init__(self) -> None:
        if self.num_full < 0 or self.num_sliding < 0:
            raise ConfigError(f"layer counts must be >= 0 (full {self.num_full}, sliding {self.num_sliding})")
        if self.num_sliding and (self.window_tokens is None or self.window_tokens <= 0):
            raise ConfigError(f"{self.num_sliding} sliding layers need a window of >= 1 token, "
                              f"got {self.window_tokens!r}")

    @property
    def num_ssm(self) -> int:
        return self.ssm.num_ssm_layers if self.ssm is not None else 0

    @property
    def num_attention(self) -> int:
        """Layers with attention weights (qkv, o): full + sliding."""
        return self.num_full + self.num_sliding

    @property
    def num_layers(self) -> int:
        return self.num_full + self.num_sliding + self.num_ssm

    def check(self, spec: ModelSpec) -> None:
        """Raise if these kinds do not add up to ``spec``'s layers."""
        if self.num_layers != spec.num_layers:
            raise ConfigError(f"{spec.name}: layer kinds ({self.describe()}) count {self.num_layers} layers, "
                              f"the shape has {spec.num_layers}")

    def describe(self) -> str:
        parts = [f"{self.num_full} full"]
        if self.num_sliding:
            parts.append(f"{self.num_sliding} sliding ({self.window_tokens})")
        if self.num_ssm:
            parts.append(f"{self.num_ssm} ssm ({self.ssm.ssm_kind if self.ssm else ''})")
        return " + ".join(parts)

    # -- builders ---------------------------------------------------------------------
    @classmethod
    def all_full(cls, spec: ModelSpec) -> "LayerKinds":
        return cls(num_full=spec.num_layers)

    @classmethod
    def from_windows(cls, windows: tuple[int | None, ...]) -> "LayerKinds":
        """One entry per layer: the window in tokens, or None for full attention."""
        sliding = {w for w in windows if w is not None}
        if len(sliding) > 1:
            raise ConfigError(f"sliding layers with different windows {sorted(sliding)} are not supported")
        return cls(num_full=sum(w is None for w in windows), num_sliding=sum(w is not None for w in windows),
                   window_tokens=sliding.pop() if sliding else None)

    @classmethod
    def from_hybrid(cls, hybrid: HybridSpec) -> "LayerKinds":
        return cls(num_full=hybrid.num_attention_layers, ssm=hybrid)

    @classmethod
    def of_model(cls, model: Any) -> "LayerKinds":
        """The kinds of a loaded forward model (qwen2.py, gemma3.py, bamba.py)."""
        if getattr(model, "is_hybrid", False):
            return cls.from_hybrid(model.hybrid)
        windows = getattr(model, "layer_windows", None)
        return cls.from_windows(tuple(windows)) if windows is not None else cls.all_full(model.spec)


def layer_kinds_from_config(cfg: Mapping[str, Any], name: str = "model", dtype: str | None = None) -> LayerKinds:
    """The kinds of a Hugging Face config.json mapping (hybrids by ``model_type``)."""
    if cfg.get("model_type") in HYBRID_MODEL_TYPES:
        return LayerKinds.from_hybrid(hybrid_spec_from_config(cfg, name=name, dtype=dtype))
    return LayerKinds.from_windows(layer_windows(cfg, name))


def load_layer_kinds(name_or_path: str, dtype: str | None = "float16") -> LayerKinds:
    """A built-in shape's kinds by name (odma_mlu/models/shapes/), or a config.json / model folder's."""
    shapes = {**BUILTIN_MODEL_SHAPES, **BUILTIN_HYBRID_SHAPES}
    if name_or_path in shapes:
        text = resources.files("odma_mlu.models").joinpath("shapes").joinpath(shapes[name_or_path]).read_text()
    else:
        path = Path(name_or_path)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"model {name_or_path!r} is neither a built-in shape ({sorted(shapes)}) "
                              "nor a config.json / model folder that exists")
        text = path.read_text()
    return layer_kinds_from_config(json.loads(text), name_or_path, dtype)


def load_target_shape(name_or_path: str, dtype: str | None = "float16") -> tuple[ModelSpec, LayerKinds]:
    """(spec, kinds) of a shape by name or path: what the emulated backend prices."""
    kinds = load_layer_kinds(name_or_path, dtype)
    if kinds.ssm is not None:
        return kinds.ssm.base, kinds
    from odma_mlu.config import load_model_spec

    return load_model_spec(name_or_path, dtype), kinds
