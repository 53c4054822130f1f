"""Gemma-3 text decoder (Gemma3ForCausalLM) forward over the KV arena and the window rings.

Per layer, for the T flattened new tokens of a ``ForwardBatch``::

    x -> RMSNorm(1+w) -> q, k, v (one fused matmul) -> RMSNorm(1+w) of q and of k per head
      -> rotary (local theta on sliding layers, global theta, maybe linearly scaled, on full)
      -> attention (scale query_pre_attn_scalar^-0.5): full layers over the arena, sliding
         layers over their rings (in the arena's tensors) -> o_proj -> RMSNorm(1+w) (post-attention) -> + residual
      -> RMSNorm(1+w) (pre-feedforward) -> GELU-tanh(gate) * up -> down
      -> RMSNorm(1+w) (post-feedforward) -> + residual

The embedding rows are multiplied by sqrt(hidden) (cast to the weight dtype first, as
transformers does); layers interleave 5 sliding : 1 full by default. Numerics follow
transformers: every RMSNorm in float32 with ``(1 + w)`` applied before the cast back, cos/sin
in float32. Plain tensors, straight torch ops, like odma_mlu/models/qwen2.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from odma_mlu.config import ModelSpec
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.models.attention import ForwardBatch
from odma_mlu.models.decoder_parts import SlidingLayout, gated_mlp, max_position, outer_shapes, outer_weights
from odma_mlu.models.layer_types import FULL, SLIDING
from odma_mlu.models.qwen2 import RotaryCache, rotary_qk
from odma_mlu.models.window_attention import RingPlan, ring_attention

ARCHITECTURE = "Gemma3ForCausalLM"
MODEL_TYPE = "gemma3_text"


@dataclass(frozen=True)
class Gemma3LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv_weight: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor
    """[heads + kv_heads, head_dim]: q_norm's weight for each query head, then k_norm's for
    each KV head, so one norm serves q and k side by side (the values of two)."""
    o_weight: torch.Tensor  # [hidden, heads * head_dim]
    o_bias: torch.Tensor | None
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor
    gate_up_weight: torch.Tensor  # [2 * intermediate, hidden]
    down_weight: torch.Tensor  # [hidden, intermediate]


@dataclass(frozen=True)
class Gemma3Extras:
    """What Gemma-3 adds to ``ModelSpec``, read from config.json."""

    query_pre_attn_scalar: float
    local_rope_theta: float
    global_rope_theta: float
    global_rope_factor: float
    """Linear RoPE scaling of the full layers (Gemma-3 4B/12B/27B: 8.0), 1.0 = none."""
    final_logit_softcapping: float | None
    attention_bias: bool


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class _LinearRotary(RotaryCache):
    """RotaryCache with transformers' 'linear' scaling: inv_freq / factor."""

    def __init__(self, head_dim: int, theta: float, factor: float, device: torch.device, dtype: torch.dtype) -> None:
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)) / factor
        self.device, self.dtype = device, dtype
        self.cos = torch.empty(0, head_dim, device=device, dtype=dtype)
        self.sin = torch.empty(0, head_dim, device=device, dtype=dtype)
        self._grow(4096)


def _rope(params: Any, kind: str, where: str) -> tuple[float | None, float]:
    """(theta or None, linear factor) of one layer type's rope parameters."""
    if not isinstance(params, dict):
        return None, 1.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"{where}: rope type {rope_type!r} of the {kind} layers is not supported "
                          "(only 'default' and 'linear')")
    theta = params.get("rope_theta")
    return (float(theta) if theta is not None else None), float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0


def extras_from_config(cfg: dict[str, Any], where: str = "config.json") -> Gemma3Extras:
    if cfg.get("attn_logit_softcapping") is not None:
        raise ConfigError(f"{where}: attn_logit_softcapping={cfg['attn_logit_softcapping']} (Gemma-2 style) is not "
                          "supported; Gemma-3 configs set it to null")
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError(f"{where}: use_bidirectional_attention=true is not supported (causal decoding only)")
    rope = cfg.get("rope_parameters") or {}
    local_theta, _ = _rope(rope.get(SLIDING), "sliding", where)
    global_theta, factor = _rope(rope.get(FULL), "full", where)
    scaling = cfg.get("rope_scaling")  # transformers 4 configs: the full layers' scaling, at top level
    if isinstance(scaling, dict):
        _, factor = _rope(scaling, "full", where)
    return Gemma3Extras(
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        local_rope_theta=local_theta or float(cfg.get("rope_local_base_freq", 10_000.0)),
        global_rope_theta=global_theta or float(cfg.get("rope_theta", 1_000_000.0)),
        global_rope_factor=factor,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        attention_bias=bool(cfg.get("attention_bias", False)),
    )


def expected_shapes(spec: ModelSpec, extras: Gemma3Extras) -> dict[str, tuple[int, ...]]:
    """Every tensor a Gemma3ForCausalLM (text) checkpoint must hold, with its shape."""
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = outer_shapes(spec)
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        a = p + "self_attn."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,),
            a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
            a + "o_proj.weight": (h, q), a + "q_norm.weight": (d,), a + "k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
        if extras.attention_bias:
            shapes.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,),
                           a + "o_proj.bias": (h,)})
    return shapes


def build(spec: ModelSpec, extras: Gemma3Extras, windows: tuple[int | None, ...],
          get: Callable[[str], torch.Tensor]) -> "Gemma3ForwardModel":
    """Assemble the model from ``get(tensor name)`` (the loader's safetensors reader)."""
    layers = []
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        a, m = p + "self_attn.", p + "mlp."
        bias = extras.attention_bias
        layers.append(Gemma3LayerWeights(
            input_norm=get(p + "input_layernorm.weight"),
            qkv_weight=torch.cat([get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")]),
            qkv_bias=torch.cat([get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias")])
            if bias else None,
            qk_norm=torch.cat([get(a + "q_norm.weight").expand(spec.num_heads, -1),
                               get(a + "k_norm.weight").expand(spec.num_kv_heads, -1)]),
            o_weight=get(a + "o_proj.weight"), o_bias=get(a + "o_proj.bias") if bias else None,
            post_attn_norm=get(p + "post_attention_layernorm.weight"),
            pre_ff_norm=get(p + "pre_feedforward_layernorm.weight"),
            post_ff_norm=get(p + "post_feedforward_layernorm.weight"),
            gate_up_weight=torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]),
            down_weight=get(m + "down_proj.weight"),
        ))
    embed, final_norm, lm_head = outer_weights(spec, get)
    return Gemma3ForwardModel(spec, extras, windows, embed, layers, final_norm, lm_head)


class Gemma3ForwardModel(SlidingLayout):
    """Gemma3ForCausalLM (text) inference; build it with ``odma_mlu.models.loader.load_model``."""

    def __init__(self, spec: ModelSpec, extras: Gemma3Extras, layer_windows: tuple[int | None, ...],
                 embed: torch.Tensor, layers: list[Gemma3LayerWeights], final_norm: torch.Tensor,
                 lm_head: torch.Tensor) -> None:
        assert len(layers) == spec.num_layers == len(layer_windows), "one weight set and one window per layer"
        self.spec, self.extras = spec, extras
        self.embed, self.layers, self.final_norm, self.lm_head = embed, layers, final_norm, lm_head
        self.device, self.dtype = embed.device, embed.dtype
        self._set_layer_windows(tuple(layer_windows))
        self.scale = extras.query_pre_attn_scalar ** -0.5
        # transformers: a float32 buffer sqrt(hidden), cast to the weight dtype, times the rows.
        self.embed_scale = torch.tensor(spec.hidden_size ** 0.5).to(self.dtype)
        self.local_rotary = RotaryCache(spec.head_dim, extras.local_rope_theta, self.device, self.dtype)
        self.global_rotary = _LinearRotary(spec.head_dim, extras.global_rope_theta, extras.global_rope_factor,
                                           self.device, self.dtype)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.spec.rms_norm_eps)
        return (xf * (1.0 + weight.float())).to(x.dtype)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, arena: KVArena, rings: RingPlan | None = None) -> torch.Tensor:
        """One step; float32 logits [num_seqs, vocab] of each sequence's last new token."""
        spec = self.spec
        assert not arena.shape_only, "forward needs an arena with tensors (shape_only=False)"
        assert arena.dtype == self.dtype, f"arena dtype {arena.dtype} differs from model dtype {self.dtype}"
        assert arena.model.num_layers == self.num_full_layers, "arena was built for a different model shape"
        assert rings is not None or not self.num_sliding_layers, "a model with sliding layers needs its RingPlan"
        heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = heads * dim, kv_heads * dim
        num_tokens = batch.num_tokens
        max_pos = max_position(batch)
        rotary = {True: self.local_rotary.lookup(batch.positions, max_pos),
                  False: self.global_rotary.lookup(batch.positions, max_pos)}

        h = self.embed.index_select(0, batch.input_ids) * self.embed_scale
        for li, w in enumerate(self.layers):
            sliding = self.layer_windows[li] is not None
            x = self._norm(h, w.input_norm)
            qkv = F.linear(x, w.qkv_weight, w.qkv_bias)
            qk = self._norm(qkv[:, :q_size + kv_size].view(num_tokens, heads + kv_heads, dim), w.qk_norm)
            q, k = rotary_qk(qk, heads, *rotary[sliding])
            v = qkv[:, q_size + kv_size:].view(num_tokens, kv_heads, dim)
            if sliding:
                assert rings is not None
                attn = ring_attention(q, k, v, rings, self.group_index[li], self.scale)
            else:
                attn = self._full_attention(q, k, v, batch, arena, self.group_index[li])
            h = h + self._norm(F.linear(attn.view(num_tokens, q_size), w.o_weight, w.o_bias), w.post_attn_norm)
            mlp = gated_mlp(self._norm(h, w.pre_ff_norm), w.gate_up_weight, w.down_weight, _gelu_tanh)
            h = h + self._norm(mlp, w.post_ff_norm)

        last = self._norm(h.index_select(0, batch.last_token_rows), self.final_norm)
        logits = F.linear(last, self.lm_head).float()
        cap = self.extras.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    __call__ = forward
