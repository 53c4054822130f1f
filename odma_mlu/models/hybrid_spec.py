"""The shape of a hybrid SSM + attention model (Bamba / Granite-4.0-H / Jamba-like).

A hybrid interleaves attention layers, whose KV grows with the sequence, with SSM (Mamba)
layers, whose state is fixed per request::

    layer:   0    1    2    3    4    5    6    7   ...
    kind:    ssm  ssm  ssm  att  ssm  ssm  ssm  att
             |                |
             conv state [conv_dim, d_conv] + ssm state [heads, head_dim, d_state] (float32)
                              K/V [tokens, kv_heads, head_dim] in the shared KV arena

So a request needs two kinds of memory: KV tokens (attention layers only) and one fixed
state slot (all SSM layers together). ``HybridSpec`` says how big each is; the model, the
state pool and the emulator's replay all read it from here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

from odma_mlu.config import DTYPE_BYTES, ModelSpec
from odma_mlu.errors import ConfigError

SSM_STATE_DTYPE_BYTES = 4  # the recurrent state is kept in float32 (as transformers keeps it)
STATE_ALIGN_BYTES = 64  # each layer's part of a slot starts on a 64-byte boundary

BUILTIN_HYBRID_SHAPES: dict[str, str] = {
    "jamba-1.5-mini": "jamba-1.5-mini.json",
    "bamba-9b": "bamba-9b.json",
}


def _align(nbytes: int) -> int:
    return (nbytes + STATE_ALIGN_BYTES - 1) // STATE_ALIGN_BYTES * STATE_ALIGN_BYTES


@dataclass(frozen=True)
class HybridSpec:
    """``base`` describes the whole stack (all layers; attention heads, MLP, vocab); the SSM
    fields describe each Mamba layer. ``ssm_kind`` "mamba2" has per-head scalar A and a
    [heads, head_dim, d_state] state; "mamba1" (Jamba) a [d_inner, d_state] state."""

    base: ModelSpec
    attention_layers: tuple[int, ...]
    ssm_kind: str
    d_inner: int
    d_state: int
    d_conv: int
    num_ssm_heads: int
    ssm_head_dim: int
    num_groups: int
    chunk_size_tokens: int
    ssm_extra_params_per_layer: int = 0
    """Mamba1 (Jamba): x_proj / dt_proj weights, counted for the weight-streaming cost."""

    def __post_init__(self) -> None:
        bad = [i for i in self.attention_layers if not 0 <= i < self.base.num_layers]
        if bad:
            raise ConfigError(f"{self.base.name}: attention layer indices {bad} outside [0, {self.base.num_layers}); "
                              "fix attn_layer_indices in config.json")
        if self.ssm_kind not in ("mamba1", "mamba2"):
            raise ConfigError(f"{self.base.name}: ssm_kind {self.ssm_kind!r} is not 'mamba1' or 'mamba2'")
        if self.ssm_kind == "mamba2" and self.num_ssm_heads * self.ssm_head_dim != self.d_inner:
            raise ConfigError(f"{self.base.name}: mamba heads {self.num_ssm_heads} x head dim {self.ssm_head_dim} "
                              f"!= d_inner {self.d_inner}; fix mamba_n_heads / mamba_d_head")

    # -- layer kinds ------------------------------------------------------------------
    @property
    def ssm_layers(self) -> tuple[int, ...]:
        att = set(self.attention_layers)
        return tuple(i for i in range(self.base.num_layers) if i not in att)

    @property
    def num_attention_layers(self) -> int:
        return len(self.attention_layers)

    @property
    def num_ssm_layers(self) -> int:
        return self.base.num_layers - len(self.attention_layers)

    @property
    def kv_spec(self) -> ModelSpec:
        """The attention layers alone: what the KV arena is shaped by."""
        return dataclasses.replace(self.base, num_layers=self.num_attention_layers)

    # -- state sizes ------------------------------------------------------------------
    @property
    def conv_dim(self) -> int:
        """Channels through the causal conv: x, plus B and C for Mamba2."""
        return self.d_inner + (2 * self.num_groups * self.d_state if self.ssm_kind == "mamba2" else 0)

    @property
    def conv_state_bytes_per_layer(self) -> int:
        return self.conv_dim * self.d_conv * self.base.dtype_bytes

    @property
    def ssm_state_bytes_per_layer(self) -> int:
        return self.d_inner * self.d_state * SSM_STATE_DTYPE_BYTES

    @property
    def state_bytes_per_layer(self) -> int:
        """One SSM layer's part of a slot (conv then ssm state, each 64-byte aligned)."""
        return _align(self.conv_state_bytes_per_layer) + _align(self.ssm_state_bytes_per_layer)

    @property
    def state_bytes_per_request(self) -> int:
        """One state slot: every SSM layer's conv + ssm state."""
        return self.num_ssm_layers * self.state_bytes_per_layer

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over the attention layers only."""
        return self.num_attention_layers * self.base.kv_bytes_per_token_per_layer

    @property
    def state_tokens_equivalent(self) -> int:
        """KV tokens whose bytes equal one state slot (rounded up)."""
        return math.ceil(self.state_bytes_per_request / self.kv_bytes_per_token)

    # -- weights ----------------------------------------------------------------------
    @property
    def ssm_params_per_layer(self) -> int:
        h, di = self.base.hidden_size, self.d_inner
        in_proj = h * (di + self.conv_dim + (self.num_ssm_heads if self.ssm_kind == "mamba2" else 0))
        conv = self.conv_dim * (self.d_conv + 1)
        out_proj = di * h
        return in_proj + conv + out_proj + di + self.ssm_extra_params_per_layer

    @property
    def attention_params_per_layer(self) -> int:
        b = self.base
        q, kv = b.num_heads * b.head_dim, b.num_kv_heads * b.head_dim
        return 2 * b.hidden_size * q + 2 * b.hidden_size * kv

    @property
    def num_params(self) -> int:
        b = self.base
        mlp = 3 * b.hidden_size * b.intermediate_size + 2 * b.hidden_size
        per_model = b.vocab_size * b.hidden_size * (1 if b.tie_word_embeddings else 2) + b.hidden_size
        return (self.num_ssm_layers * self.ssm_params_per_layer + self.num_attention_layers
                * self.attention_params_per_layer + b.num_layers * mlp + per_model)

    @property
    def weight_bytes(self) -> int:
        """Every weight, held on the device (what a cache budget is left after)."""
        return self.num_params * self.base.dtype_bytes

    @property
    def streamed_weight_bytes(self) -> int:
        """Weights a forward step reads once (all but the embedding table's unread rows)."""
        b = self.base
        embed_only = 0 if b.tie_word_embeddings else b.vocab_size * b.hidden_size
        return (self.num_params - embed_only) * b.dtype_bytes


def _float(value: Any) -> float:
    """config.json numbers; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    if isinstance(value, Mapping) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def time_step_limit(cfg: Mapping[str, Any]) -> tuple[float, float]:
    lim = cfg.get("time_step_limit") or (0.0, float("inf"))
    return _float(lim[0]), _float(lim[1])


def hybrid_spec_from_config(cfg: Mapping[str, Any], name: str = "model", dtype: str | None = None) -> HybridSpec:
    """HybridSpec of a Bamba / GraniteMoeHybrid (Mamba2) or Jamba (Mamba1) config.json mapping."""
    model_type = cfg.get("model_type")
    base = ModelSpec.from_hf_config(cfg, name=name, dtype=dtype)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        base = dataclasses.replace(base, rope_theta=float(rope["rope_theta"]))
    if base.dtype not in DTYPE_BYTES:
        raise ConfigError(f"model {name!r}: dtype {base.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    h, layers = base.hidden_size, base.num_layers
    if model_type == "jamba":
        period, offset = int(cfg.get("attn_layer_period", 8)), int(cfg.get("attn_layer_offset", 4))
        d_inner = int(cfg.get("mamba_expand", 2)) * h
        d_state, dt_rank = int(cfg.get("mamba_d_state", 16)), int(cfg.get("mamba_dt_rank") or math.ceil(h / 16))
        extra = d_inner * (dt_rank + 2 * d_state) + dt_rank * d_inner + d_inner + d_inner * d_state
        return HybridSpec(base, tuple(i for i in range(layers) if i % period == offset), "mamba1", d_inner, d_state,
                          int(cfg.get("mamba_d_conv", 4)), 1, d_inner, 1, 0, extra)
    if model_type in ("bamba", "granitemoehybrid"):
        if model_type == "bamba":
            attn = tuple(int(i) for i in (cfg.get("attn_layer_indices") or ()))
        else:
            attn = tuple(i for i, t in enumerate(cfg.get("layer_types") or ()) if t == "attention")
        d_inner = int(cfg.get("mamba_expand", 2)) * h
        heads = int(cfg.get("mamba_n_heads", 128))
        d_head = cfg.get("mamba_d_head", "auto")
        d_head = d_inner // heads if d_head in (None, "auto") else int(d_head)
        return HybridSpec(base, attn, "mamba2", d_inner, int(cfg.get("mamba_d_state", 256)),
                          int(cfg.get("mamba_d_conv", 4)), heads, d_head, int(cfg.get("mamba_n_groups", 1)),
                          int(cfg.get("mamba_chunk_size", 256)))
    raise ConfigError(f"model {name!r}: model_type {model_type!r} is not a supported hybrid "
                      "(bamba, granitemoehybrid, jamba)")


def load_hybrid_spec(name: str, dtype: str | None = "float16") -> HybridSpec:
    """A built-in hybrid shape (odma_mlu/models/shapes/) by name."""
    if name not in BUILTIN_HYBRID_SHAPES:
        raise ConfigError(f"unknown hybrid shape {name!r}; choose one of {sorted(BUILTIN_HYBRID_SHAPES)}")
    text = resources.files("odma_mlu.models").joinpath("shapes").joinpath(BUILTIN_HYBRID_SHAPES[name]).read_text()
    return hybrid_spec_from_config(json.loads(text), name=name, dtype=dtype)
