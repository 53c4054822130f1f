"""The time of one engine step on a device profile, for a model shape and a KV layout.

A step is the sequence of kernels our Qwen2 forward (odma_mlu/models/qwen2.py) launches.
Each kernel takes the longer of its memory and compute time, and pays one launch::

    time_s = sum over kernels k of max(bytes_k / bandwidth_k, flops_k / flops(dtype, rows_k))
           + kernels * launch_overhead

per layer:  4 weight matmuls (qkv, o, gate_up, down): the weight streamed once at the
            sequential bandwidth; 2 M K N FLOPs at the rate the device reaches with
            M = the step's new tokens as rows (``DeviceProfile.matmul_flops``)
            decode attention: each sequence's KV read at the bandwidth its layout achieves
            plus the new tokens' K/V written; 4 x heads x head_dim x context FLOPs at the
            rate of one row (decode attention kernels walk query rows one by one)
            prefill attention: causal FLOPs at the rate of M = new tokens rows
            every other kernel (norms, rotary, residual adds, K/V scatter, index ops):
            a launch only; their activations are small next to weights and KV
once:       LM head matmul over one row per sequence, embedding rows, final norm

``run_bytes`` is how much KV sits contiguously: a contiguous slab holds one sequence's K
(or V) for one layer in one run of ``context * kv_heads * head_dim * dtype`` bytes; a paged
layout breaks it into runs of one page. ``locality`` (DeviceProfile.locality) is the
profile's measured gather/sequential ratio at that run size, non-decreasing in size, so a
contiguous layout is never slower than a paged one and a profile whose gather curve equals
its sequential curve makes paging free.

Why per kernel and not max(all memory, all compute): kernels run one after another, so a
compute-bound matmul does not hide a memory-bound attention read. Why every kernel pays a
launch: eager PyTorch pays a dispatch (host) cost per op. On a synchronous device (CPU)
it adds to every kernel; on an asynchronous one it overlaps with the big kernels, so
there the formula overstates by one launch per matmul/attention call (~2% of a 7B step).
Why small-M FLOP/s: a decode step multiplies ``batch`` rows by each weight, and few rows
run far below the dense peak (measured: 7 GFLOP/s at M=1 against 83 at M=1024 on the CPU
host); decode attention runs at the one-row rate (measured with the profiler's curve
against torch's CPU flash kernel).

The kernel counts below are the ops our forward dispatches (views excluded), counted by
tests/test_cost_model.py with a TorchDispatchMode on a real forward, so they follow the code.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.profile import DeviceProfile
from odma_mlu.config import ModelSpec
from odma_mlu.engine.step_work import StepWork

# Non-view ops dispatched by Qwen2ForwardModel.forward (counted; see the module docstring).
KERNELS_PER_LAYER = 36  # norms, qkv, rotary, K/V scatter, o, residuals, gate_up, act, down
KERNELS_PER_DECODE_GROUP_PER_LAYER = 3  # gather q rows, attention, scatter the output rows
KERNELS_PER_GATHERED_GROUP_PER_LAYER = 2  # a group not read as a view gathers its K and V
KERNELS_PER_PREFILL_PER_LAYER = 2  # attention, copy the output rows
KERNELS_PER_COPY_PER_LAYER = 2  # one contiguous copy of K and one of V
KERNELS_FIXED = 15  # rotary lookup, embedding, buffers, final norm, LM head, logits cast


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
    copy_bytes: int = 0

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


class CostModel:
    """Step times for one (device profile, model shape) pair: THE step-cost function.

    The replay, the emulated engine and the emulated server all price steps with
    ``step_time(StepWork)``; nothing else computes a step's time."""

    def __init__(self, profile: DeviceProfile, model: ModelSpec, dtype: str | None = None) -> None:
        self.profile = profile
        self.model = model
        self.dtype = dtype or model.dtype
        self._stream_bw = profile.stream_bandwidth_bytes_per_s
        self._flops = profile.flops_for(self.dtype)
        self._launch = profile.launch_overhead_s
        self._half_kv_per_token_layer = model.kv_bytes_per_token_per_layer // 2
        h, d, i = model.hidden_size, model.head_dim, model.intermediate_size
        q, kv = model.num_heads * d, model.num_kv_heads * d
        # (K, N) of each weight matmul of a layer; biases and norms ride with them.
        self._layer_matmuls = ((h, q + 2 * kv), (q, h), (h, 2 * i), (i, h))
        self._attn_width = q
        self._locality_cache: dict[int, float] = {}
        self._rate_cache: dict[int, float] = {}

    def run_bandwidth(self, run_tokens: int) -> float:
        """Achieved bandwidth reading a run of ``run_tokens`` (K or V of one layer is one
        physical run of ``run_tokens * kv_heads * head_dim * dtype`` bytes)."""
        run_bytes = run_tokens * self._half_kv_per_token_layer
        loc = self._locality_cache.get(run_bytes)
        if loc is None:
            loc = self.profile.locality(run_bytes)
            self._locality_cache[run_bytes] = loc
        return self._stream_bw * loc

    def read_run_s(self, tokens: int) -> float:
        """Seconds to read one run of ``tokens`` of KV in every layer (K and V)."""
        if tokens <= 0:
            return 0.0
        return self.model.num_layers * tokens * self.model.kv_bytes_per_token_per_layer / self.run_bandwidth(tokens)

    def copy_s(self, tokens: int) -> float:
        """Seconds to copy ``tokens`` of KV contiguously in every layer: read + write, and
        the copy kernels' launches."""
        if tokens <= 0:
            return 0.0
        nbytes = tokens * self.model.kv_bytes_per_token
        return 2.0 * nbytes / self._stream_bw + self.model.num_layers * KERNELS_PER_COPY_PER_LAYER * self._launch

    def matmul_rate(self, rows: int) -> float:
        """FLOP/s of a matmul with ``rows`` rows on this profile, in this model's dtype."""
        r = self._rate_cache.get(rows)
        if r is None:
            r = self.profile.matmul_flops(self.dtype, rows)
            self._rate_cache[rows] = r
        return r

    def num_kernels(self, work: StepWork) -> int:
        """Ops our forward dispatches for ``work`` (plus the KV copies it issued)."""
        groups = work.decode_group_sizes
        per_layer = (KERNELS_PER_LAYER + KERNELS_PER_DECODE_GROUP_PER_LAYER * len(groups)
                     + KERNELS_PER_GATHERED_GROUP_PER_LAYER * (len(groups) - work.decode_group_views)
                     + KERNELS_PER_PREFILL_PER_LAYER * len(work.prefill_new_tokens)
                     + KERNELS_PER_COPY_PER_LAYER * len(work.copy_tokens))
        return self.model.num_layers * per_layer + KERNELS_FIXED

    def step_time(self, work: StepWork) -> StepCost:
        """Cost of one step described by ``work`` (see ``odma_mlu.engine.step_work``)."""
        m = self.model
        if work.is_empty and not work.copy_tokens:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0.0)
        layers = m.num_layers
        dbytes = m.dtype_bytes
        num_seqs = len(work.prefill_new_tokens) + work.num_decodes
        new_tokens = sum(work.prefill_new_tokens) + work.num_decodes
        memory_s = compute_s = time_s = 0.0
        flops = 0.0

        if num_seqs:
            # Weight matmuls: every layer's 4, then the LM head (one row per sequence).
            rate = self.matmul_rate(new_tokens)
            layer_time = 0.0
            for k, n in self._layer_matmuls:
                mem, f = k * n * dbytes / self._stream_bw, 2.0 * new_tokens * k * n
                comp = f / rate
                memory_s += layers * mem
                compute_s += layers * comp
                flops += layers * f
                layer_time += max(mem, comp)
            time_s += layers * layer_time
            vocab_k_n = m.hidden_size * m.vocab_size
            mem, f = vocab_k_n * dbytes / self._stream_bw, 2.0 * num_seqs * vocab_k_n
            comp = f / self.matmul_rate(num_seqs)
            memory_s += mem
            compute_s += comp
            flops += f
            time_s += max(mem, comp)

        # Decode attention: each run read at the bandwidth of its length + new K/V written.
        kv_read = 0
        attn_mem = 0.0  # one layer
        ctx_sum = 0
        per_token_layer = m.kv_bytes_per_token_per_layer
        for runs in work.decode_read_runs:
            for n in runs:
                if n <= 0:
                    continue
                nbytes = n * per_token_layer
                kv_read += layers * nbytes
                attn_mem += nbytes / self.run_bandwidth(n)
                ctx_sum += n
        kv_write = new_tokens * m.kv_bytes_per_token
        write_mem = new_tokens * per_token_layer / self._stream_bw
        if work.decode_read_runs:
            f = 4.0 * self._attn_width * ctx_sum
            # Decode attention runs one query row at a time: the CPU flash kernel measured at
            # the 1-row matmul rate (2.6 ms/layer at batch 16 x 1024 context on cpu-host),
            # not the g-row rate; on accelerators this term is small next to the KV read.
            comp = f / self.matmul_rate(1)
            memory_s += layers * (attn_mem + write_mem)
            compute_s += layers * comp
            flops += layers * f
            time_s += layers * max(attn_mem + write_mem, comp)
        else:
            memory_s += layers * write_mem
            time_s += layers * write_mem
        # Prefill attention: causal, q rows = the chunk's new tokens over cached + new keys.
        cached = work.prefill_cached_tokens or (0,) * len(work.prefill_new_tokens)
        for t, c in zip(work.prefill_new_tokens, cached):
            f = 4.0 * self._attn_width * t * (c + (t + 1) / 2.0)
            comp = f / self.matmul_rate(max(1, t))
            compute_s += layers * comp
            flops += layers * f
            time_s += layers * comp
        # KV copies the policy issued (contiguous, read + write at stream bandwidth).
        copy_bytes = 2 * sum(work.copy_tokens) * m.kv_bytes_per_token
        memory_s += copy_bytes / self._stream_bw
        time_s += copy_bytes / self._stream_bw

        overhead_s = self.num_kernels(work) * self._launch
        time_s += overhead_s
        return StepCost(
            time_s=time_s, memory_s=memory_s, compute_s=compute_s, overhead_s=overhead_s,
            weight_bytes=m.streamed_weight_bytes if num_seqs else 0, kv_read_bytes=kv_read, kv_write_bytes=kv_write,
            flops=flops, copy_bytes=copy_bytes,
        )
