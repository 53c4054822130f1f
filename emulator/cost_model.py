"""The time of one engine step on a device profile, for a model shape and a KV layout.

A step is the sequence of kernels our Qwen2 forward (odma_mlu/models/qwen2.py) launches.
Each kernel takes the longer of its memory and compute time, and pays one launch::

    time_s = sum over kernels k of max(bytes_k / bandwidth_k, flops_k / flops(dtype, rows_k))
           + kernels * launch_overhead
           + attention calls * (attention_call_overhead - launch_overhead)

(an attention call's own fixed cost, set-up and view ops, past its launch: the profile's
``attention_call_overhead``, one launch where the profile has none)

per layer:  4 weight matmuls (qkv, o, gate_up, down): the weight streamed once at the
            sequential bandwidth; 2 M K N FLOPs at the rate the device reaches with
            M = the step's new tokens as rows (``DeviceProfile.matmul_flops``)
            decode attention: each sequence's KV read at the bandwidth its layout achieves
            plus the new tokens' K/V written; 4 x heads x head_dim x context FLOPs at the
            rate of one row (decode attention kernels walk query rows one by one).
            With ``decode_attention: gather`` (the profile's default, what the code
            issues) each gathered group's slots, padded to its longest member
            (``StepWork.decode_gathered_tokens``), are also written to a buffer and read
            back by attention at stream bandwidth, and the padding is scored too;
            ``in_place`` prices a kernel that reads the runs where they lie.
            A decode read in parts (``StepWork.decode_split_parts``) reads its long runs
            where they lie and gathers only its other runs (in ``decode_gathered_tokens``);
            each part is one more attention call, and the step merges them (launches only:
            the merge's activations are a few rows)
            prefill attention: causal FLOPs at the rate of M = new tokens rows, against its
            read of the K/V of every token it attends (cached + new): one run in place at
            that run's bandwidth; over several runs (``StepWork.prefill_read_runs``) a gather
            kernel first reads the runs and writes a buffer, which attention reads at stream
            bandwidth
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

Layer kinds (``LayerKinds``, odma_mlu/models/layer_kinds.py; without one every layer is
full attention)::

    full attention   as above, over ``decode_read_runs``
    sliding window   the same weight matmuls; a decode reads its ``decode_sliding_runs`` (at
                     most the window; default min(context, window) as one run); a prefill
                     chunk attends, under the sliding mask, to the cached tokens still in the
                     window plus its own: the masked kernel computes every score, so
                     4 x heads x head_dim x new x (min(cached, window - 1) + new) FLOPs
                     against those keys' K/V read at stream bandwidth; only the last
                     ``window`` new tokens are written
    SSM (Mamba)      in_proj / out_proj (+ x_proj, dt_proj for Mamba1) matmuls; a decode
                     reads and writes each sequence's state once (stream bandwidth); a
                     prefill runs the chunked scan (6 t d_inner d_state, + Mamba2's
                     intra-chunk 2 t L heads (d_state + head_dim) FLOPs) and writes the state
    KV copies        ``copy_tokens``, run in ``copy_batch_sizes`` batches (KVArena.copy_run):
                     each copy reads its run and writes one, at the bandwidth of a run of
                     its length; a batch of one copy is a contiguous copy of K and of V per
                     layer, a larger one a gather and a scatter of each (+ two index uploads)
    state copies     ``state_copy_bytes``: read + write at stream bandwidth, one launch each
    host swaps       ``swap_tokens``: a preempted request's KV to host memory or back
                     (kvcache/arena.py ``swap_out`` / ``swap_in``): over the host link at the
                     profile's ``host_link`` bandwidth, plus a device-side gather (or scatter)
                     through a contiguous staging copy (read + write at stream bandwidth)

The kernel counts are the ops our forwards dispatch (views excluded), per architecture
and layer kind: emulator/kernel_counts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Sequence

from emulator.kernel_counts import FORWARD_KERNELS, QWEN2_KERNELS, StepKernels
from emulator.profile import DeviceProfile
from odma_mlu.config import ModelSpec
from odma_mlu.engine.step_work import StepWork, ViewRule
from odma_mlu.models.layer_kinds import LayerKinds


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
    state_bytes: int = 0
    """SSM state read + written (decodes) and written (prefills)."""
    swap_bytes: int = 0
    """KV moved over the host link (swaps of preempted requests)."""
    gather_s: float = 0.0
    """Of ``time_s``, what gather buffers add (launches aside): decode groups' slots
    (padding included, and its scores) and multi-run prefills' K/V, written to a buffer and
    read back."""
    copy_s: float = 0.0
    """Of ``time_s``, the memory time of the KV and state copies the policy issued."""
    swap_s: float = 0.0
    """Of ``time_s``, the host-link and staging time of swaps."""

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


class _Acc:
    """Running sums of one step: kernel times take max(memory, compute) each."""

    __slots__ = ("time_s", "memory_s", "compute_s", "flops", "gather_s")

    def __init__(self) -> None:
        self.time_s = self.memory_s = self.compute_s = self.flops = 0.0
        self.gather_s = 0.0  # the time gather buffers add (``StepCost.gather_s``)

    def add(self, count: int, memory_s: float, compute_s: float, flops: float) -> None:
        self.memory_s += count * memory_s
        self.compute_s += count * compute_s
        self.flops += count * flops
        self.time_s += count * max(memory_s, compute_s)


class _RunReadSeconds(dict[int, float]):
    """Seconds one layer takes to read a run of ``n`` tokens, by ``n``: K and V, at the
    bandwidth of the run's length (``CostModel.run_bandwidth``); filled on first use."""

    def __init__(self, model: "CostModel") -> None:
        super().__init__()
        self._model = model

    def __missing__(self, n: int) -> float:
        seconds = n * self._model.model.kv_bytes_per_token_per_layer / self._model.run_bandwidth(n) if n > 0 else 0.0
        self[n] = seconds
        return seconds


class CostModel:
    """Step times for one (device profile, model shape, layer kinds): THE step-cost function.

    The replay (every model family), the emulated engine and the emulated server all price
    steps with ``step_time(StepWork)``; nothing else computes a step's time."""

    def __init__(self, profile: DeviceProfile, model: ModelSpec, dtype: str | None = None,
                 layers: LayerKinds | None = None) -> None:
        self.profile = profile
        self.model = model
        self.layers = layers or LayerKinds.all_full(model)
        self.layers.check(model)
        self.dtype = dtype or model.dtype
        profile.flops_for(self.dtype)  # a profile without a compute peak for the dtype fails here, by name
        self.kernels = FORWARD_KERNELS.get(model.architecture, QWEN2_KERNELS)
        self._stream_bw = profile.stream_bandwidth_bytes_per_s
        self._launch = profile.launch_overhead_s
        self._call_extra = profile.attention_call_s - profile.launch_overhead_s  # per attention call
        self._gathers = profile.decode_attention == "gather"
        self._half_kv_per_token_layer = model.kv_bytes_per_token_per_layer // 2
        self._n_full, self._n_sliding, self._n_ssm = self.layers.num_full, self.layers.num_sliding, self.layers.num_ssm
        self.counts = StepKernels(self.kernels, self._n_full, self._n_sliding, self._n_ssm,
                                  self.layers.ssm.d_conv if self.layers.ssm is not None else 0, self._gathers)
        h, d, i = model.hidden_size, model.head_dim, model.intermediate_size
        q, kv = model.num_heads * d, model.num_kv_heads * d
        # (K, N) of each weight matmul of a layer; biases and norms ride with them.
        self._attn_matmuls = ((h, q + 2 * kv), (q, h))
        self._mlp_matmuls = ((h, 2 * i), (i, h))
        self._ssm_matmuls: tuple[tuple[int, int], ...] = ()
        hs = self.layers.ssm
        if hs is not None:
            in_width = hs.d_inner + hs.conv_dim + (hs.num_ssm_heads if hs.ssm_kind == "mamba2" else 0)
            self._ssm_matmuls = ((h, in_width), (hs.d_inner, h))
            if hs.ssm_extra_params_per_layer:  # Mamba1's x_proj / dt_proj
                self._ssm_matmuls += ((hs.ssm_extra_params_per_layer // hs.d_inner, hs.d_inner),)
        self._attn_width = q
        self._locality_cache: dict[int, float] = {}
        self._rate_cache: dict[int, float] = {}
        self._run_read_s = _RunReadSeconds(self)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over the full-attention layers (what the arena holds)."""
        return self._n_full * self.model.kv_bytes_per_token_per_layer

    def swap_capacity_tokens(self, swap_space_bytes: int) -> int:
        """KV tokens that ``swap_space_bytes`` of host memory holds; 0 where the profile has
        no ``host_link`` to price a swap with (every preemption then recomputes)."""
        if self.profile.host_link_bandwidth_bytes_per_s is None:
            return 0
        return swap_space_bytes // self.kv_bytes_per_token

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
        """Seconds to read one run of ``tokens`` of KV in every full-attention layer (K and V)."""
        if tokens <= 0:
            return 0.0
        return self._n_full * tokens * self.model.kv_bytes_per_token_per_layer / self.run_bandwidth(tokens)

    def decode_fixed_s(self) -> float:
        """Seconds of a decode step that do not grow with the batch: one sequence reading a
        one-token context (the weights, the LM head, the launches). Read once per policy."""
        return self.step_time(StepWork.build(decode_read_runs=((1,),))).time_s

    def _group_call_s(self) -> float:
        """What one more decode group costs a full layer beyond its bytes and FLOPs: its
        kernels' launches and the attention call's fixed cost (``attention_call_overhead``)."""
        return self.kernels.decode_group * self._launch + self._call_extra

    def view_min_tokens(self) -> int | None:
        """The shortest decode in one run worth reading alone, in place, rather than in its
        span class's gathered group: a group of its own costs one more call per full layer
        (``_group_call_s``) and saves the gather of its slots (written to the buffer and
        read back at stream bandwidth). None where the profile's attention reads runs in
        place (nothing is gathered, so nothing is saved). Leaving the group may shrink its
        padding too, which is not counted: the rule errs towards the group."""
        if not self._gathers or not self._n_full:
            return None
        saved_per_token_s = 2 * self.model.kv_bytes_per_token_per_layer / self._stream_bw
        return max(1, ceil(self._group_call_s() / saved_per_token_s))

    def view_rule(self, part_kernels: int | None = None) -> ViewRule | None:
        """The rule the engine reads decodes in place by, alone or in parts (``ViewRule``):
        the view length, and the split reads' merge (``split_merge`` launches a layer) and
        parts in attention calls; ``part_kernels``: the ops a part issues where the engine's
        device has no kernel that returns the log-sum-exp (default: the table's, one). None
        where nothing is gathered (``view_min_tokens``)."""
        view = self.view_min_tokens()
        if view is None:
            return None
        call_s = self._group_call_s()
        merge_launches = self.kernels.split_merge
        if call_s <= 0:  # calls cost nothing: weigh the merge in launches, as before calls were priced
            return ViewRule(view, float(merge_launches))
        extra_part_s = max(0, (part_kernels or self.kernels.split_part) - self.kernels.split_part) * self._launch
        return ViewRule(view, merge_launches * self._launch / call_s, 1.0 + extra_part_s / call_s)

    def copy_kernels(self, num_copies: int) -> int:
        """Kernels of one batch of ``num_copies`` KV copies (``KVArena.take_issued_copies``)."""
        return self.counts.copies(num_copies)

    def copy_bytes_s(self, tokens: int) -> float:
        """Seconds of the memory traffic of one copy of ``tokens`` of KV: its run read and its
        run written, each at the bandwidth of a run of that length."""
        if tokens <= 0:
            return 0.0
        return 2.0 * tokens * self.kv_bytes_per_token / self.run_bandwidth(tokens)

    def copy_s(self, tokens: int, num_pending: int = 0) -> float:
        """Seconds one more copy of ``tokens`` of KV adds to a step whose batch already holds
        ``num_pending`` copies: its bytes, and the launches it adds to the batch (a second
        copy turns the batch into gathers and scatters; from the third on, none)."""
        if tokens <= 0:
            return 0.0
        launches = self.copy_kernels(num_pending + 1) - self.copy_kernels(num_pending)
        return self.copy_bytes_s(tokens) + launches * self._launch

    def matmul_rate(self, rows: int) -> float:
        """FLOP/s of a matmul with ``rows`` rows on this profile, in this model's dtype."""
        r = self._rate_cache.get(rows)
        if r is None:
            r = self.profile.matmul_flops(self.dtype, rows)
            self._rate_cache[rows] = r
        return r

    def num_kernels(self, work: StepWork) -> int:
        """Ops our forward dispatches for ``work`` (``StepKernels.kernels``)."""
        return self.counts.kernels(work)

    def num_attention_calls(self, work: StepWork) -> int:
        """Attention calls among them (``StepKernels.attention_calls``): each pays the profile's
        ``attention_call_overhead`` beyond its launch."""
        return self.counts.attention_calls(work)

    def _prefill_reads(self, acc: _Acc, work: StepWork) -> None:
        """Full-layer prefill attention: its causal FLOPs against the read of the K/V of every
        token it attends, one run in place, else through a gather kernel that reads the runs
        and writes a buffer the attention reads at stream bandwidth; ``ideal``'s at stream
        bandwidth as one run. With ``decode_attention: in_place`` (a kernel that reads runs
        where they lie) a multi-run prefill reads its runs, each at its own bandwidth."""
        per_token_layer = self.model.kv_bytes_per_token_per_layer
        cached = work.prefill_cached_tokens or (0,) * len(work.prefill_new_tokens)
        runs_of = work.prefill_read_runs or tuple((c + t,) for t, c in zip(work.prefill_new_tokens, cached))
        for t, c, runs in zip(work.prefill_new_tokens, cached, runs_of):
            total = c + t
            f = 4.0 * self._attn_width * t * (c + (t + 1) / 2.0)
            gathered = len(runs) > 1 and self._gathers and not work.stream_reads
            if work.stream_reads or gathered:
                read_s = total * per_token_layer / self._stream_bw
            else:
                read_s = self._read(runs)[1]
            acc.add(self._n_full, read_s, f / self.matmul_rate(max(1, t)), f)
            if gathered:
                gather_s = self._read(runs)[1] + total * per_token_layer / self._stream_bw
                acc.add(self._n_full, gather_s, 0.0, 0.0)
                acc.gather_s += self._n_full * gather_s

    def _sliding_runs(self, work: StepWork) -> Sequence[tuple[int, ...]]:
        if work.decode_sliding_runs:
            assert len(work.decode_sliding_runs) == work.num_decodes, (
                f"{len(work.decode_sliding_runs)} sliding reads for {work.num_decodes} decodes")
            return work.decode_sliding_runs
        w = self.layers.window_tokens or 0
        return [(min(sum(r), w),) for r in work.decode_read_runs]

    def _attention_reads(self, acc: _Acc, layers: int, reads: Sequence[tuple[int, ...]], written_tokens: int,
                         stream_reads: bool = False, gathered_tokens: int = 0, padding_tokens: int = 0) -> int:
        """Decode attention of ``layers`` layers over ``reads`` (each run at the bandwidth of
        its length, or all at the stream bandwidth with ``stream_reads``: ``ideal``) + the
        new tokens' K/V written; returns the KV bytes read. Where the profile's attention
        gathers, ``gathered_tokens`` slots (``padding_tokens`` of them past their sequence's
        length) are written to the gather buffer and read back, and the padding scored."""
        if layers == 0:
            return 0
        per_token_layer = self.model.kv_bytes_per_token_per_layer
        write_mem = written_tokens * per_token_layer / self._stream_bw
        if not reads:
            acc.add(layers, write_mem, 0.0, 0.0)
            return 0
        read_mem = 0.0  # one layer
        ctx_sum = 0
        for runs in reads:
            if stream_reads:
                tokens = sum(runs)
                mem = tokens * per_token_layer / self._stream_bw
            else:
                tokens, mem = self._read(runs)
            read_mem += mem
            ctx_sum += tokens
        kv_read = ctx_sum * per_token_layer
        # Decode attention runs one query row at a time: the CPU flash kernel measured at the
        # 1-row matmul rate (2.6 ms/layer at batch 16 x 1024 context on cpu-host), not the
        # g-row rate; on accelerators this term is small next to the KV read.
        rate = self.matmul_rate(1)
        f = 4.0 * self._attn_width * ctx_sum
        if self._gathers and gathered_tokens:
            # The buffer written and read back, and the padding scored: what they add to the
            # kernel's time is the step's gather time (``StepCost.gather_s``).
            plain_s = max(read_mem + write_mem, f / rate)
            read_mem += 2 * gathered_tokens * per_token_layer / self._stream_bw
            f = 4.0 * self._attn_width * (ctx_sum + padding_tokens)
            acc.gather_s += layers * (max(read_mem + write_mem, f / rate) - plain_s)
        acc.add(layers, read_mem + write_mem, f / rate, f)
        return layers * kv_read

    def _read(self, runs: tuple[int, ...]) -> tuple[int, float]:
        """(tokens, seconds) of one sequence's read of ``runs`` (positive token lengths) in one
        layer, each run at the bandwidth of its length. Sums at C speed over memoized
        per-length seconds: a paged long request reads hundreds of runs every step."""
        return sum(runs), sum(map(self._run_read_s.__getitem__, runs))

    def _matmuls(self, acc: _Acc, layers: int, shapes: Sequence[tuple[int, int]], rows: int) -> None:
        if layers == 0:
            return
        rate = self.matmul_rate(rows)
        dbytes = self.model.dtype_bytes
        for k, n in shapes:
            f = 2.0 * rows * k * n
            acc.add(layers, k * n * dbytes / self._stream_bw, f / rate, f)

    def step_time(self, work: StepWork) -> StepCost:
        """Cost of one step described by ``work`` (see ``odma_mlu.engine.step_work``)."""
        m, kinds = self.model, self.layers
        if work.is_empty and not work.copy_tokens and not work.state_copy_bytes and not work.swap_tokens:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0.0)
        num_seqs = len(work.prefill_new_tokens) + work.num_decodes
        new_tokens = sum(work.prefill_new_tokens) + work.num_decodes
        acc = _Acc()
        if num_seqs:
            # Weight matmuls of every layer by kind, then the LM head (one row per sequence).
            self._matmuls(acc, kinds.num_attention, self._attn_matmuls, new_tokens)
            self._matmuls(acc, kinds.num_layers, self._mlp_matmuls, new_tokens)
            self._matmuls(acc, self._n_ssm, self._ssm_matmuls, new_tokens)
            self._matmuls(acc, 1, ((m.hidden_size, m.vocab_size),), num_seqs)
        # Decode attention: each run read at the bandwidth of its length + new K/V written.
        kv_read = self._attention_reads(acc, self._n_full, work.decode_read_runs, new_tokens, work.stream_reads,
                                        work.decode_gathered_tokens, work.decode_padding_tokens)
        per_token_layer = m.kv_bytes_per_token_per_layer
        kv_write = new_tokens * self._n_full * per_token_layer
        cached = work.prefill_cached_tokens or (0,) * len(work.prefill_new_tokens)
        if self._n_sliding:
            w = kinds.window_tokens or 0
            sliding_written = sum(min(t, w) for t in work.prefill_new_tokens) + work.num_decodes
            sliding = self._sliding_runs(work) if work.num_decodes else ()
            # One gather over every decode, padded to the longest window read (window_attention.py).
            lengths = [sum(r) for r in sliding]
            gathered = len(lengths) * max(lengths, default=0)
            kv_read += self._attention_reads(acc, self._n_sliding, sliding, sliding_written, work.stream_reads,
                                             gathered, gathered - sum(lengths))
            kv_write += sliding_written * self._n_sliding * per_token_layer
        # Prefill attention, q rows = the chunk's new tokens: causal over cached + new keys in
        # full layers; the sliding mask's every score over the window's cached keys + new
        # (read at stream bandwidth: the ring's cached entries are gathered first, counted
        # in ``sliding_cached_prefill``).
        if self._n_full:
            self._prefill_reads(acc, work)
        for t, c in zip(work.prefill_new_tokens, cached):
            if self._n_sliding:
                attended = min(c, (kinds.window_tokens or 1) - 1) + t
                f = 4.0 * self._attn_width * t * attended
                acc.add(self._n_sliding, attended * per_token_layer / self._stream_bw, f / self.matmul_rate(max(1, t)), f)
        state_bytes = self._ssm_state(acc, work)
        # KV copies the policy issued (a run read + a run written each), state copies.
        copy_bytes = 2 * sum(work.copy_tokens) * self.kv_bytes_per_token + 2 * sum(work.state_copy_bytes)
        copy_s = sum(self.copy_bytes_s(n) for n in work.copy_tokens) + 2 * sum(work.state_copy_bytes) / self._stream_bw
        acc.add(1, copy_s, 0.0, 0.0)
        swap_bytes = sum(work.swap_tokens) * self.kv_bytes_per_token
        swap_s = 0.0
        if swap_bytes:
            link = self.profile.host_link_bandwidth_bytes_per_s
            assert link is not None, f"profile {self.profile.name} has no host_link: it cannot price a swap"
            swap_s = swap_bytes / link + 2 * swap_bytes / self._stream_bw
            acc.add(1, swap_s, 0.0, 0.0)

        overhead_s = self.num_kernels(work) * self._launch
        if self._call_extra:
            overhead_s += self.num_attention_calls(work) * self._call_extra
        weights = (kinds.ssm.streamed_weight_bytes if kinds.ssm is not None else m.streamed_weight_bytes)
        return StepCost(
            time_s=acc.time_s + overhead_s, memory_s=acc.memory_s, compute_s=acc.compute_s, overhead_s=overhead_s,
            weight_bytes=weights if num_seqs else 0, kv_read_bytes=kv_read, kv_write_bytes=kv_write,
            flops=acc.flops, copy_bytes=copy_bytes, state_bytes=state_bytes, swap_bytes=swap_bytes,
            gather_s=acc.gather_s, copy_s=copy_s, swap_s=swap_s,
        )

    def graph_pays(self, eager: StepWork, batch_pad: int, span_tokens: int) -> bool:
        """Whether a decode-only step replayed from a captured graph beats ``eager`` (the same
        decodes run eagerly). The graph folds the step's launches into one (optimistic: a
        device still pays a little per kernel) but gathers ``batch_pad`` rows of
        ``span_tokens`` slots, where the eager groups gather only to their own longest member
        and read a lone one-run sequence in place; each extra slot is written, read back and
        scored in every full layer. Everything else is the same work, so it is not priced:
        ``DecodeGraphRunner`` asks on every decode-only step."""
        per_slot_s = self._n_full * (2 * self.model.kv_bytes_per_token_per_layer / self._stream_bw
                                     + 4.0 * self._attn_width / self.matmul_rate(1))
        extra_slots = batch_pad * span_tokens - eager.decode_gathered_tokens
        return extra_slots * per_slot_s < (self.num_kernels(eager) - 1) * self._launch

    def _ssm_state(self, acc: _Acc, work: StepWork) -> int:
        """SSM layers: each decode reads and writes its state; each prefill scans in chunks
        and writes its state. Returns the state bytes moved."""
        hs = self.layers.ssm
        if hs is None or not self._n_ssm:
            return 0
        layer_state = hs.state_bytes_per_layer
        moved = 0
        if work.num_decodes:
            nbytes = 2 * work.num_decodes * layer_state
            acc.add(self._n_ssm, nbytes / self._stream_bw, 0.0, 0.0)
            moved += self._n_ssm * nbytes
        for t in work.prefill_new_tokens:
            # state updates 6 t d_inner d_state; Mamba2's intra-chunk (attention-like) part
            # 2 t L heads (d_state + head_dim) with chunks of L tokens.
            f = 6.0 * t * hs.d_inner * hs.d_state
            if hs.ssm_kind == "mamba2":
                f += 2.0 * t * min(t, hs.chunk_size_tokens) * hs.num_ssm_heads * (hs.d_state + hs.ssm_head_dim)
            acc.add(self._n_ssm, layer_state / self._stream_bw, f / self.matmul_rate(max(1, t)), f)
            moved += self._n_ssm * layer_state
        return moved
