"""The time of one engine step on a device profile, for a model shape and a KV layout.

::

    memory_s  = weights / stream_bw                       (every weight read once a step)
              + sum_seq KV_read(seq) / (stream_bw * locality(run_bytes))
              + KV_written / stream_bw
    compute_s = FLOPs / peak_flops(dtype)
    time_s    = max(memory_s, compute_s) + kernels * launch_overhead

``run_bytes`` is how much KV sits contiguously: a contiguous slab holds one sequence's K
(or V) for one layer in one run of ``context * kv_heads * head_dim * dtype`` bytes; a paged
layout breaks it into runs of one page. ``locality`` (DeviceProfile.locality) is the
profile's measured gather/sequential ratio at that run size, non-decreasing in size, so a
contiguous layout is never slower than a paged one and a profile whose gather curve equals
its sequential curve makes paging free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from emulator.profile import DeviceProfile
from odma_mlu.config import ModelSpec

# Kernels launched per decoder layer in one step (norm, qkv, rope, attention, o-proj, norm,
# gate/up, act, down, residual adds ~ 10), plus embedding, final norm and LM head.
KERNELS_PER_LAYER = 10
KERNELS_FIXED = 3


@dataclass(frozen=True)
class KVLayout:
    """How a sequence's KV is placed: one contiguous slab, or pages of ``page_tokens``."""

    kind: str = "contiguous"
    page_tokens: int = 16

    def __post_init__(self) -> None:
        assert self.kind in ("contiguous", "paged"), f"unknown KV layout {self.kind!r}"
        assert self.page_tokens > 0, "page_tokens must be positive"

    def run_tokens(self, context_tokens: int) -> int:
        if self.kind == "contiguous":
            return context_tokens
        return min(context_tokens, self.page_tokens)


CONTIGUOUS = KVLayout("contiguous")


@dataclass(frozen=True)
class StepCost:
    time_s: float
    memory_s: float
    compute_s: float
    overhead_s: float
    weight_bytes: int
    kv_read_bytes: int
    kv_write_bytes: int
    flops: float

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


class CostModel:
    """Step times for one (device profile, model shape) pair."""

    def __init__(self, profile: DeviceProfile, model: ModelSpec, dtype: str | None = None) -> None:
        self.profile = profile
        self.model = model
        self.dtype = dtype or model.dtype
        self._stream_bw = profile.stream_bandwidth_bytes_per_s
        self._flops = profile.flops_for(self.dtype)
        self._half_kv_per_token_layer = model.kv_bytes_per_token_per_layer // 2
        lm_head = model.vocab_size * model.hidden_size
        self._body_params = model.matmul_params - lm_head
        self._lm_head_params = lm_head
        self._attn_width = model.num_heads * model.head_dim
        self._locality_cache: dict[int, float] = {}

    def kv_bandwidth(self, context_tokens: int, layout: KVLayout) -> float:
        """Achieved bandwidth reading one sequence's KV of ``context_tokens`` in ``layout``."""
        run_bytes = layout.run_tokens(context_tokens) * self._half_kv_per_token_layer
        loc = self._locality_cache.get(run_bytes)
        if loc is None:
            loc = self.profile.locality(run_bytes)
            self._locality_cache[run_bytes] = loc
        return self._stream_bw * loc

    def step(self, prefill_tokens: Sequence[int] = (), decode_context_tokens: Sequence[int] = (),
             layout: KVLayout = CONTIGUOUS) -> StepCost:
        """Cost of one step.

        prefill_tokens: new tokens of each sequence being prefilled (whole prompt, or prompt
            plus already generated tokens when a preempted sequence is recomputed).
        decode_context_tokens: for each decoding sequence, the tokens already in its KV.
        """
        m = self.model
        if not prefill_tokens and not decode_context_tokens:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0.0)
        weight_bytes = m.streamed_weight_bytes
        memory_s = weight_bytes / self._stream_bw
        kv_read = 0
        for ctx in decode_context_tokens:
            if ctx <= 0:
                continue
            nbytes = ctx * m.kv_bytes_per_token
            kv_read += nbytes
            memory_s += nbytes / self.kv_bandwidth(ctx, layout)
        new_tokens = sum(prefill_tokens) + len(decode_context_tokens)
        kv_write = new_tokens * m.kv_bytes_per_token
        memory_s += kv_write / self._stream_bw

        # Matmuls: 2 FLOPs per parameter per token; the LM head runs on the last token only.
        flops = 2.0 * self._body_params * new_tokens
        flops += 2.0 * self._lm_head_params * (len(prefill_tokens) + len(decode_context_tokens))
        # Attention: QK^T and PV, 2 FLOPs each per (query, key, head dim element).
        attn = 0.0
        for t in prefill_tokens:
            attn += t * (t + 1) / 2.0
        attn += sum(max(c, 0) + 1 for c in decode_context_tokens)
        flops += 4.0 * m.num_layers * self._attn_width * attn
        compute_s = flops / self._flops
        overhead_s = (m.num_layers * KERNELS_PER_LAYER + KERNELS_FIXED) * self.profile.launch_overhead_s
        return StepCost(
            time_s=max(memory_s, compute_s) + overhead_s, memory_s=memory_s, compute_s=compute_s,
            overhead_s=overhead_s, weight_bytes=weight_bytes, kv_read_bytes=kv_read, kv_write_bytes=kv_write,
            flops=flops,
        )
