"""Step time of a hybrid SSM + attention model on a device profile (shape only).

Same pricing rule as emulator/cost_model.py (each kernel takes the longer of its memory and
compute time and pays one launch; KV read at the bandwidth its run length achieves), over
the hybrid's two layer kinds::

    every layer:      MLP matmuls (gate_up, down), weights streamed once per step
    attention layer:  qkv and o matmuls; decode attention reads each sequence's KV in runs of
                      ``kv_run_tokens`` (the page) at profile.locality(run bytes); prefill
                      attention FLOPs at the rate of the prompt's rows
    SSM layer:        in_proj / out_proj (+ x_proj, dt_proj for Mamba1) matmuls; a decode
                      reads and writes each sequence's state (one contiguous slot part);
                      a prefill runs the chunked scan (FLOPs) and writes the state
    once:             LM head over one row per sequence
    copies:           capacity migration moves (AVMP): read + write of the bytes, one
                      launch per copy

Kernel counts per layer are those of odma_mlu/models/bamba.py (attention as qwen2.py's).
This file prices the hybrid replay only; when the lead's run-aware cost model lands, its
attention and copy terms should be called from here instead of repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from emulator.profile import DeviceProfile
from odma_mlu.models.hybrid_spec import HybridSpec

KERNELS_ATTENTION_LAYER = 40  # norms, qkv, partial rotary (cat), K/V scatter, o, residuals, MLP
KERNELS_PER_DECODE_GROUP = 3
KERNELS_PER_PREFILL_ATTENTION = 2
KERNELS_SSM_LAYER = 30  # norms, in_proj, split, gated norm, out_proj, residuals, MLP
KERNELS_SSM_DECODE = 30  # gathers, conv step, recurrent step, scatters (once for all decodes)
KERNELS_SSM_PREFILL = 45  # conv + chunked scan ops, per prefilling sequence
KERNELS_FIXED = 15


@dataclass(frozen=True)
class HybridStepCost:
    time_s: float
    weight_s: float
    attention_s: float
    state_s: float
    copy_s: float
    overhead_s: float


class HybridCostModel:
    def __init__(self, profile: DeviceProfile, hybrid: HybridSpec) -> None:
        self.profile, self.hybrid = profile, hybrid
        b = hybrid.base
        self.dtype = b.dtype
        self.bw = profile.stream_bandwidth_bytes_per_s
        self.launch = profile.launch_overhead_s
        h, d, i = b.hidden_size, b.head_dim, b.intermediate_size
        q, kv = b.num_heads * d, b.num_kv_heads * d
        self.q_width = q
        self.mlp = ((h, 2 * i), (i, h))
        self.attention = ((h, q + 2 * kv), (q, h))
        extra = (hybrid.ssm_extra_params_per_layer // hybrid.d_inner, hybrid.d_inner) \
            if hybrid.ssm_extra_params_per_layer else None
        in_width = hybrid.d_inner + hybrid.conv_dim + (hybrid.num_ssm_heads if hybrid.ssm_kind == "mamba2" else 0)
        self.ssm = ((h, in_width), (hybrid.d_inner, h)) + ((extra,) if extra else ())
        self._rates: dict[int, float] = {}
        self._locality: dict[int, float] = {}

    def rate(self, rows: int) -> float:
        r = self._rates.get(rows)
        if r is None:
            r = self._rates[rows] = self.profile.matmul_flops(self.dtype, max(1, rows))
        return r

    def _matmuls(self, shapes: Sequence[tuple[int, int]], rows: int) -> float:
        db = self.hybrid.base.dtype_bytes
        return sum(max(k * n * db / self.bw, 2.0 * rows * k * n / self.rate(rows)) for k, n in shapes)

    def kv_bandwidth(self, context_tokens: int, run_tokens: int) -> float:
        half = self.hybrid.base.kv_bytes_per_token_per_layer // 2
        run_bytes = min(context_tokens, run_tokens) * half
        loc = self._locality.get(run_bytes)
        if loc is None:
            loc = self._locality[run_bytes] = self.profile.locality(run_bytes)
        return self.bw * loc

    def step(self, prefill_tokens: Sequence[int], decode_context_tokens: Sequence[int], kv_run_tokens: int,
             copy_bytes: Sequence[int] = ()) -> HybridStepCost:
        hs, b = self.hybrid, self.hybrid.base
        num_seqs = len(prefill_tokens) + len(decode_context_tokens)
        if num_seqs == 0 and not copy_bytes:
            return HybridStepCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        rows = sum(prefill_tokens) + len(decode_context_tokens)
        n_att, n_ssm = hs.num_attention_layers, hs.num_ssm_layers
        weight_s = 0.0
        if num_seqs:
            weight_s = (b.num_layers * self._matmuls(self.mlp, rows) + n_att * self._matmuls(self.attention, rows)
                        + n_ssm * self._matmuls(self.ssm, rows)
                        + self._matmuls(((b.hidden_size, b.vocab_size),), num_seqs))
        # Attention: decode KV reads at the page's locality; prefill causal FLOPs.
        attention_s = 0.0
        per_token_layer = b.kv_bytes_per_token_per_layer
        if decode_context_tokens:
            mem = sum(ctx * per_token_layer / self.kv_bandwidth(ctx, kv_run_tokens) for ctx in decode_context_tokens)
            mem += len(decode_context_tokens) * per_token_layer / self.bw
            comp = 4.0 * self.q_width * (sum(decode_context_tokens) + len(decode_context_tokens)) / self.rate(1)
            attention_s += n_att * max(mem, comp)
        for t in prefill_tokens:
            attention_s += n_att * max(t * per_token_layer / self.bw, 4.0 * self.q_width * t * (t + 1) / 2.0
                                       / self.rate(t))
        # SSM state: decode reads + writes each state; prefill scans and writes it.
        state_s = 0.0
        layer_state = hs.state_bytes_per_layer
        if decode_context_tokens:
            state_s += n_ssm * 2.0 * len(decode_context_tokens) * layer_state / self.bw
        for t in prefill_tokens:
            # state updates 6 t d_inner d_state; Mamba2's intra-chunk (attention-like) part
            # 2 t L heads (d_state + head_dim) with chunks of L tokens.
            scan_flops = 6.0 * t * hs.d_inner * hs.d_state
            if hs.ssm_kind == "mamba2":
                scan_flops += 2.0 * t * min(t, hs.chunk_size_tokens) * hs.num_ssm_heads * (hs.d_state + hs.ssm_head_dim)
            state_s += n_ssm * max(layer_state / self.bw, scan_flops / self.rate(t))
        copy_s = sum(2.0 * c / self.bw for c in copy_bytes)
        kernels = KERNELS_FIXED + len(copy_bytes)
        if num_seqs:
            kernels += n_att * (KERNELS_ATTENTION_LAYER + KERNELS_PER_PREFILL_ATTENTION * len(prefill_tokens)
                                + (KERNELS_PER_DECODE_GROUP if decode_context_tokens else 0))
            kernels += n_ssm * (KERNELS_SSM_LAYER + KERNELS_SSM_PREFILL * len(prefill_tokens)
                                + (KERNELS_SSM_DECODE if decode_context_tokens else 0))
        overhead_s = kernels * self.launch
        time_s = weight_s + attention_s + state_s + copy_s + overhead_s
        return HybridStepCost(time_s, weight_s, attention_s, state_s, copy_s, overhead_s)
