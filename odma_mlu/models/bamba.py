"""Bamba (BambaForCausalLM: Mamba2 + attention) forward over the KV arena and a state pool.

Per layer, for the T flattened new tokens of a ``ForwardBatch``::

    x [T, hidden] -> RMSNorm -> mixer -> + residual -> RMSNorm -> gate_up -> SiLU(gate)*up -> down -> + residual

    mixer = attention (layers in attn_layer_indices): fused qkv -> partial rotary (first half
            of head_dim) -> write K/V to the arena -> prefill plans / decode groups -> o_proj;
            exactly qwen2.py's sequence of helpers, over the arena's attention-layer index
          | Mamba2 (every other layer): in_proj -> split gate | xBC | dt ->
            per prefilling sequence: causal conv + chunked scan from its slot's state
            decoding sequences together: conv step + recurrent step on their slots' states
            -> gated RMSNorm -> out_proj

The SSM state lives in a ``StatePool`` slot per request (``state_slots[i]`` for
``batch.seqs[i]``). A sequence whose ``num_cached_tokens`` is 0 starts from a zero state,
so a preempted request that is prefilled again from prompt + generated tokens recomputes
its state exactly as it was. Numerics follow transformers' Bamba torch path (float32 norms,
rotary cos/sin in float32, float32 scan state), so greedy output matches ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.state_pool import StatePool
from odma_mlu.models.attention import ForwardBatch, arena_attention
from odma_mlu.models.decoder_parts import gated_mlp, max_position, rms_norm
from odma_mlu.models.hybrid_spec import HybridSpec
from odma_mlu.models.mamba2 import chunk_scan, conv_decode, conv_prefill, gated_rms_norm, recurrent_step
from odma_mlu.models.qwen2 import RotaryCache, rotary_qk


@dataclass(frozen=True)
class AttentionWeights:
    qkv_weight: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # [hidden, heads * head_dim]
    o_bias: torch.Tensor | None


@dataclass(frozen=True)
class MambaWeights:
    in_proj_weight: torch.Tensor  # [d_inner + conv_dim + heads, hidden]
    in_proj_bias: torch.Tensor | None
    conv_weight: torch.Tensor  # [conv_dim, d_conv]
    conv_bias: torch.Tensor | None
    dt_bias: torch.Tensor  # [heads]
    a: torch.Tensor  # [heads] float32, = -exp(A_log)
    d: torch.Tensor  # [heads]
    norm_weight: torch.Tensor  # [d_inner]
    out_weight: torch.Tensor  # [hidden, d_inner]
    out_bias: torch.Tensor | None


@dataclass(frozen=True)
class BambaLayer:
    input_norm: torch.Tensor
    mixer: AttentionWeights | MambaWeights
    post_norm: torch.Tensor  # pre_ff_layernorm
    gate_up_weight: torch.Tensor  # [2 * intermediate, hidden]
    down_weight: torch.Tensor  # [hidden, intermediate]


class BambaForwardModel:
    """BambaForCausalLM inference; build it with ``odma_mlu.models.loader.load_model``."""

    is_hybrid = True

    def __init__(self, hybrid: HybridSpec, embed: torch.Tensor, layers: list[BambaLayer], final_norm: torch.Tensor,
                 lm_head: torch.Tensor, dt_limit: tuple[float, float] = (0.0, float("inf"))) -> None:
        spec = hybrid.base
        assert len(layers) == spec.num_layers, f"{len(layers)} layers given, spec has {spec.num_layers}"
        self.hybrid = hybrid
        self.spec = spec
        self.embed, self.layers, self.final_norm, self.lm_head = embed, layers, final_norm, lm_head
        self.device, self.dtype = embed.device, embed.dtype
        self.dt_limit = dt_limit
        self.scale = spec.head_dim ** -0.5
        self.rotary_dim = spec.head_dim // 2  # transformers hard-codes partial_rotary_factor 0.5 for Bamba
        self.rotary = RotaryCache(self.rotary_dim, spec.rope_theta, self.device, self.dtype)
        # Model layer -> index into the arena's K/V (attention) or the pool's states (SSM).
        self.kv_index = {layer: i for i, layer in enumerate(hybrid.attention_layers)}
        self.state_index = {layer: i for i, layer in enumerate(hybrid.ssm_layers)}

    # -- mixers -------------------------------------------------------------------------
    def _attention(self, x: torch.Tensor, w: AttentionWeights, batch: ForwardBatch, arena: KVArena, layer: int,
                   cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        heads, kv_heads, dim, rot = spec.num_heads, spec.num_kv_heads, spec.head_dim, self.rotary_dim
        q_size, kv_size = heads * dim, kv_heads * dim
        num_tokens = batch.num_tokens
        qkv = F.linear(x, w.qkv_weight, w.qkv_bias)
        q, k = rotary_qk(qkv[:, :q_size + kv_size].view(num_tokens, heads + kv_heads, dim), heads, cos, sin, rot)
        v = qkv[:, q_size + kv_size:].view(num_tokens, kv_heads, dim)
        li = self.kv_index[layer]
        attn = arena_attention(q, k, v, batch, arena.k[li], arena.v[li], self.scale)
        return F.linear(attn.view(num_tokens, q_size), w.o_weight, w.o_bias)

    def _mamba(self, x: torch.Tensor, w: MambaWeights, batch: ForwardBatch, states: StatePool, layer: int,
               state_slots: Sequence[int]) -> torch.Tensor:
        hs = self.hybrid
        d_inner, heads, head_dim, groups, n = hs.d_inner, hs.num_ssm_heads, hs.ssm_head_dim, hs.num_groups, hs.d_state
        conv_dim = hs.conv_dim
        proj = F.linear(x, w.in_proj_weight, w.in_proj_bias)
        gate, xbc, dt = proj.split([d_inner, conv_dim, heads], dim=-1)
        conv_states, ssm_states = states.conv[self.state_index[layer]], states.ssm[self.state_index[layer]]
        # Rows in the batch's layout (ForwardBatch): the prefills' first, then the decodes',
        # consecutive; each part's output joins in that order, so no row is gathered or scattered.
        parts: list[torch.Tensor] = []
        for i in batch.prefill_seqs:  # a prompt (fresh state) or a later chunk (continues the slot's state)
            seq, slot, row = batch.seqs[i], state_slots[i], batch.seq_rows[i]
            count, fresh = seq.num_new_tokens, seq.num_cached_tokens == 0
            rows = slice(row, row + count)
            out, conv_states[slot] = conv_prefill(xbc[rows], None if fresh else conv_states[slot], w.conv_weight,
                                                  w.conv_bias, hs.d_conv)
            xs, b, c = out.split([d_inner, groups * n, groups * n], dim=-1)
            ys, ssm_states[slot] = chunk_scan(xs.reshape(count, heads, head_dim), dt[rows], w.a,
                                              b.reshape(count, groups, n), c.reshape(count, groups, n), w.d,
                                              w.dt_bias, hs.chunk_size_tokens, self.dt_limit,
                                              None if fresh else ssm_states[slot])
            parts.append(ys.reshape(count, d_inner).float())
        if batch.decode_seqs:
            rows, batch_size = batch.decode_rows, len(batch.decode_seqs)
            slots_t = torch.tensor([state_slots[i] for i in batch.decode_seqs], dtype=torch.int64, device=self.device)
            out, new_conv = conv_decode(xbc[rows], conv_states.index_select(0, slots_t), w.conv_weight, w.conv_bias)
            conv_states.index_copy_(0, slots_t, new_conv.to(conv_states.dtype))
            xs, b, c = out.split([d_inner, groups * n, groups * n], dim=-1)
            ys, new_ssm = recurrent_step(ssm_states.index_select(0, slots_t), xs.reshape(batch_size, heads, head_dim),
                                         dt[rows], w.a, b.reshape(batch_size, groups, n),
                                         c.reshape(batch_size, groups, n), w.d, w.dt_bias)
            ssm_states.index_copy_(0, slots_t, new_ssm.to(ssm_states.dtype))
            # transformers casts the recurrent output to the activation dtype before the norm.
            parts.append(ys.reshape(batch_size, d_inner).float())
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        normed = gated_rms_norm(y, gate, w.norm_weight, d_inner // groups, self.spec.rms_norm_eps)
        return F.linear(normed.to(self.dtype), w.out_weight, w.out_bias)

    # -- the step -----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, arena: KVArena, states: StatePool,
                state_slots: Sequence[int]) -> torch.Tensor:
        """Run one step: write new K/V to ``arena`` and new SSM state to ``states`` (slot
        ``state_slots[i]`` for ``batch.seqs[i]``); return float32 logits [num_seqs, vocab]."""
        assert not arena.shape_only and not states.shape_only, "forward needs tensors (shape_only=False)"
        assert arena.dtype == self.dtype, f"arena dtype {arena.dtype} differs from model dtype {self.dtype}"
        assert arena.model.num_layers == self.hybrid.num_attention_layers, \
            f"arena has {arena.model.num_layers} layers, the model {self.hybrid.num_attention_layers} attention layers"
        assert len(state_slots) == batch.num_seqs, f"{len(state_slots)} state slots for {batch.num_seqs} sequences"
        cos, sin = self.rotary.lookup(batch.positions, max_position(batch))
        eps = self.spec.rms_norm_eps
        h = self.embed.index_select(0, batch.input_ids)
        for layer, w in enumerate(self.layers):
            x = rms_norm(h, w.input_norm, eps)
            if isinstance(w.mixer, AttentionWeights):
                h = h + self._attention(x, w.mixer, batch, arena, layer, cos, sin)
            else:
                h = h + self._mamba(x, w.mixer, batch, states, layer, state_slots)
            h = h + gated_mlp(rms_norm(h, w.post_norm, eps), w.gate_up_weight, w.down_weight)
        last = rms_norm(h.index_select(0, batch.last_token_rows), self.final_norm, eps)
        return F.linear(last, self.lm_head).float()

    __call__ = forward

    def new_arena(self, capacity_tokens: int) -> KVArena:
        """KV arena for the attention layers only, on the model's device and dtype."""
        return KVArena(self.hybrid.kv_spec, capacity_tokens, device=self.device, dtype=self.dtype)

    def new_state_pool(self, num_slots: int) -> StatePool:
        """State pool of ``num_slots`` request slots for the SSM layers."""
        return StatePool(self.hybrid, num_slots, device=self.device, dtype=self.dtype)
