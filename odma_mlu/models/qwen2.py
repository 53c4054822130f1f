"""Qwen2 decoder forward over odma-mlu's KV arena.

Per layer, for the T flattened new tokens of a ``ForwardBatch``::

    x [T, hidden] -> RMSNorm -> qkv (one fused matmul, with biases) -> rotary(q and k at once)
                  -> write k, v to arena slots -> attention (prefill plans, decode groups)
                  -> o_proj -> + residual -> RMSNorm -> gate_up (fused) -> SiLU(gate)*up
                  -> down -> + residual

Weights are plain tensors (no nn.Module): the loader fills them and the forward is a
straight sequence of torch ops, so it runs the same on CPU, CUDA and MLU. Numerics follow
transformers' Qwen2 (RMSNorm in float32, rotary cos/sin computed in float32 then cast to the
activation dtype) so greedy output matches ``generate`` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from odma_mlu.config import ModelSpec
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.models.attention import DecodeGroup, ForwardBatch, PrefillPlan, SequenceInput
from odma_mlu.models.decoder_parts import SlidingLayout, gated_mlp, max_position, rms_norm
from odma_mlu.models.window_attention import RingPlan, ring_attention

__all__ = ["ForwardBatch", "SequenceInput", "DecodeGroup", "PrefillPlan", "LayerWeights", "Qwen2ForwardModel"]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. ``qkv_*`` stacks q, k, v rows; ``gate_up`` stacks gate, up rows."""

    input_norm: torch.Tensor  # [hidden]
    qkv_weight: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim]
    o_weight: torch.Tensor  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up_weight: torch.Tensor  # [2 * intermediate, hidden]
    down_weight: torch.Tensor  # [hidden, intermediate]


class RotaryCache:
    """cos/sin of every position, computed in float32 and grown on demand (doubling).

    Grown lazily because max_position_embeddings can be 131072: a full table of a 7B model
    would be 64 MiB for positions that short requests never reach.
    """

    def __init__(self, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype,
                 initial_positions: int = 4096) -> None:
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.device, self.dtype = device, dtype
        self.cos = torch.empty(0, head_dim, device=device, dtype=dtype)
        self.sin = torch.empty(0, head_dim, device=device, dtype=dtype)
        self._grow(initial_positions)

    def _grow(self, num_positions: int) -> None:
        # Same float32 ops as transformers' Qwen2RotaryEmbedding, so the values are bit-equal.
        freqs = torch.arange(num_positions, dtype=torch.int64).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device=self.device, dtype=self.dtype)
        self.sin = emb.sin().to(device=self.device, dtype=self.dtype)

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim] for ``positions`` (``max_position`` = their max, known by the caller)."""
        if max_position >= self.cos.shape[0]:
            self._grow(max(2 * self.cos.shape[0], max_position + 1))
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_qk(qk: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, D] and k [T, kv_heads, D], rotated, from ``qk`` [T, heads + kv_heads, D]
    (the q and k of a fused projection, heads side by side): one pass of elementwise ops serves
    both, with the values of rotating each. ``rotary_dim``: rotate only the first that many
    channels of each head (partial rotary; cos/sin [T, 1, rotary_dim])."""
    if rotary_dim is None or rotary_dim == qk.shape[-1]:
        qk = qk * cos + _rotate_half(qk) * sin
    else:
        part = qk[..., :rotary_dim]
        qk = torch.cat([part * cos + _rotate_half(part) * sin, qk[..., rotary_dim:]], dim=-1)
    return qk[:, :heads], qk[:, heads:]


class Qwen2ForwardModel(SlidingLayout):
    """Qwen2ForCausalLM inference over a ``KVArena``; build it with ``odma_mlu.models.loader.load_model``.

    ``layer_windows[i]`` is layer i's sliding window in tokens, None for full attention
    (``layer_types`` in config.json). Full layers keep their KV in the arena (which then has
    only those layers, in order); sliding layers keep per-request rings inside the same
    arena's tensors (``RingPool``, odma_mlu/kvcache/window.py).
    """

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[LayerWeights], final_norm: torch.Tensor,
                 lm_head: torch.Tensor, layer_windows: tuple[int | None, ...] | None = None) -> None:
        assert len(layers) == spec.num_layers, f"{len(layers)} layers given, spec has {spec.num_layers}"
        self._set_layer_windows(tuple(layer_windows) if layer_windows is not None else (None,) * spec.num_layers)
        self.spec = spec
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head  # the same tensor as embed when tie_word_embeddings
        self.device = embed.device
        self.dtype = embed.dtype
        self.scale = spec.head_dim ** -0.5
        self.rotary = RotaryCache(spec.head_dim, spec.rope_theta, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, arena: KVArena, rings: RingPlan | None = None) -> torch.Tensor:
        """Run one step: write every new token's K/V into ``arena`` (sliding layers: into
        ``rings``); return float32 logits [num_seqs, vocab] of each sequence's last new token,
        in ``batch.seqs`` order."""
        spec = self.spec
        assert not arena.shape_only, "forward needs an arena with tensors (shape_only=False)"
        assert arena.dtype == self.dtype, f"arena dtype {arena.dtype} differs from model dtype {self.dtype}"
        assert rings is not None or not self.num_sliding_layers, "a model with sliding layers needs its RingPlan"
        assert arena.model.num_layers == self.num_full_layers and arena.model.num_kv_heads == spec.num_kv_heads \
            and arena.model.head_dim == spec.head_dim, "arena was built for a different model shape"
        heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = heads * dim, kv_heads * dim
        num_tokens = batch.num_tokens
        cos, sin = self.rotary.lookup(batch.positions, max_position(batch))
        eps = spec.rms_norm_eps

        h = self.embed.index_select(0, batch.input_ids)  # [T, hidden]
        for li, w in enumerate(self.layers):
            x = rms_norm(h, w.input_norm, eps)
            qkv = F.linear(x, w.qkv_weight, w.qkv_bias)
            q, k = rotary_qk(qkv[:, :q_size + kv_size].view(num_tokens, heads + kv_heads, dim), heads, cos, sin)
            v = qkv[:, q_size + kv_size:].view(num_tokens, kv_heads, dim)
            if self.layer_windows[li] is not None:
                assert rings is not None
                attn = ring_attention(q, k, v, rings, self.group_index[li], self.scale)
            else:
                attn = self._full_attention(q, k, v, batch, arena, self.group_index[li])
            h = h + F.linear(attn.view(num_tokens, q_size), w.o_weight)
            h = h + gated_mlp(rms_norm(h, w.post_norm, eps), w.gate_up_weight, w.down_weight)

        last = rms_norm(h.index_select(0, batch.last_token_rows), self.final_norm, eps)
        return F.linear(last, self.lm_head).float()

    __call__ = forward
