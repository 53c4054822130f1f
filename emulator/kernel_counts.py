"""Ops each forward dispatches, per architecture and layer kind, and the count for one step
(``StepKernels``): the step-cost function's launch counts (emulator/cost_model.py charges
each one ``launch_overhead``, and each attention call among them the profile's
``attention_call_overhead`` beyond that).

Counted, not estimated: tests/test_kernel_counts.py and tests/test_cost_model_kinds.py run the
real forwards (qwen2.py with window_attention.py, gemma3.py, bamba.py with mamba2.py) under a
TorchDispatchMode and hold these numbers to what they dispatch (views excluded), so a change
to a forward that adds or removes an op fails there until the table follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from odma_mlu.engine.step_work import SPLIT_MERGE_KERNELS, StepWork

# Non-view ops dispatched by Qwen2ForwardModel.forward (counted; see the module docstring).
KERNELS_PER_LAYER = 31  # norms, qkv, rotary (q and k at once), K/V scatter, o, residuals, gate_up, act, down
KERNELS_PER_DECODE_GROUP_PER_LAYER = 1  # attention (its query rows are a slice: ForwardBatch's row layout)
KERNELS_PER_DECODE_GATHER_PER_LAYER = 2  # K and V of every group not read as a view, one gather each
KERNELS_PER_SPLIT_PART_PER_LAYER = 1  # a split read's part: attention returning its log-sum-exp
KERNELS_PER_PREFILL_PER_LAYER = 1  # attention
KERNELS_PER_ATTENTION_CAT_PER_LAYER = 1  # the calls' outputs concatenated, where a layer makes several
KERNELS_PER_GATHERED_PREFILL_PER_LAYER = 2  # a prefill over several runs gathers its K and V
KERNELS_PER_COPY_PER_LAYER = 2  # one contiguous copy of K and one of V
KERNELS_PER_COPY_BATCH_PER_LAYER = 4  # several copies at once: a gather and a scatter of K and of V
KERNELS_PER_COPY_BATCH = 2  # ... and the two slot-index uploads of the batch
KERNELS_FIXED = 14  # rotary lookup, embedding, buffers, final norm, LM head, logits cast
KERNELS_PER_SWAP_PER_LAYER = 4  # K and V: a gather (scatter) and a host copy each


@dataclass(frozen=True)
class ForwardKernels:
    """Ops one architecture's forward dispatches, per layer kind (counted, not estimated)."""

    fixed: int = KERNELS_FIXED
    full_layer: int = KERNELS_PER_LAYER
    sliding_layer: int = KERNELS_PER_LAYER + 2  # the ring write (4 ops) replaces the K/V scatter (2)
    ssm_layer: int = 37  # norms, in_proj, gated norm, out_proj, residuals, MLP
    decode_group: int = KERNELS_PER_DECODE_GROUP_PER_LAYER  # per full layer and decode group
    decode_gather: int = KERNELS_PER_DECODE_GATHER_PER_LAYER  # per full layer, once when a decode group gathers
    split_part: int = KERNELS_PER_SPLIT_PART_PER_LAYER  # per full layer and part of a decode read in parts
    split_merge: int = SPLIT_MERGE_KERNELS  # per full layer, once when decodes are read in parts
    prefill: int = KERNELS_PER_PREFILL_PER_LAYER  # per full layer and prefill
    attention_cat: int = KERNELS_PER_ATTENTION_CAT_PER_LAYER  # per full or sliding layer with more than one call
    sliding_prefill: int = 1  # per sliding layer and prefill: attention
    gathered_prefill: int = KERNELS_PER_GATHERED_PREFILL_PER_LAYER  # per full layer and multi-run prefill
    sliding_cached_prefill: int = 4  # a prefill with cached tokens gathers them from the ring (K, V)
    sliding_decode: int = 3  # per sliding layer, once when the step decodes: K and V gathers, attention
    ssm_prefill: int = 66  # per SSM layer and prefill: causal conv + chunked scan (its output cast to float32)
    ssm_prefill_continued: int = 1  # a later chunk prepends the slot's conv state
    ssm_prefill_short: int = 1  # a fresh prefill shorter than d_conv pads the conv input
    ssm_decode: int = 34  # per SSM layer, once when the step decodes: conv step + recurrent step
    copy: int = KERNELS_PER_COPY_PER_LAYER  # per full layer and batch of one KV copy
    copy_batch: int = KERNELS_PER_COPY_BATCH_PER_LAYER  # per full layer and batch of several
    copy_batch_fixed: int = KERNELS_PER_COPY_BATCH  # per batch of several
    state_copy: int = 1  # per state copy
    swap: int = KERNELS_PER_SWAP_PER_LAYER  # per full layer and host swap (+ 1 for its slot index)


QWEN2_KERNELS = ForwardKernels()
FORWARD_KERNELS: dict[str, ForwardKernels] = {
    "Qwen2ForCausalLM": QWEN2_KERNELS,
    # 4 RMSNorms (1 + w), q and k normed together, embedding scale, GELU-tanh: gemma3.py
    "Gemma3ForCausalLM": ForwardKernels(fixed=19, full_layer=65, sliding_layer=67),
    # partial rotary (q and k at once, a cat) on attention layers; Mamba2 mixers: bamba.py, mamba2.py
    "BambaForCausalLM": ForwardKernels(fixed=14, full_layer=32, sliding_layer=34),
}
# Hybrids without a forward of their own here are counted as Bamba (Jamba's Mamba1 included).
FORWARD_KERNELS["GraniteMoeHybridForCausalLM"] = FORWARD_KERNELS["JambaForCausalLM"] = \
    FORWARD_KERNELS["BambaForCausalLM"]


@dataclass(frozen=True)
class StepKernels:
    """The ops our forward dispatches for one step (``StepWork``) of a model with ``num_full``
    full-attention, ``num_sliding`` sliding-window and ``num_ssm`` SSM layers, from its
    architecture's table; ``gathers``: the device's decode attention gathers multi-run reads
    (the profile's ``decode_attention``)."""

    table: ForwardKernels
    num_full: int
    num_sliding: int
    num_ssm: int
    ssm_d_conv: int
    """The SSM layers' convolution width (0 without them)."""
    gathers: bool

    def copies(self, num_copies: int) -> int:
        """Kernels of one batch of ``num_copies`` KV copies (``KVArena.take_issued_copies``)."""
        k = self.table
        if num_copies <= 0:
            return 0
        if num_copies == 1:
            return self.num_full * k.copy
        return self.num_full * k.copy_batch + k.copy_batch_fixed

    def gathered_prefills(self, work: StepWork) -> int:
        """Prefills whose cached + new tokens lie in several runs, gathered where the device's
        attention gathers (``ideal``'s never: each of its reads is one run)."""
        if work.stream_reads or not self.gathers:
            return 0
        return sum(len(runs) > 1 for runs in work.prefill_read_runs)

    def kernels(self, work: StepWork) -> int:
        """Ops the forward dispatches for ``work``, plus the KV and state copies and the swaps
        it issued."""
        k = self.table
        groups = work.decode_group_sizes
        prefills = len(work.prefill_new_tokens)
        cached = work.prefill_cached_tokens or (0,) * prefills
        splits = work.decode_split_parts
        # One gather of K and V for every gathered group and split read's gathered part.
        gathers = len(groups) > work.decode_group_views or work.decode_split_rests > 0
        calls = len(groups) + prefills + (1 if splits else 0)  # the split reads' merged output is one call's
        full = (k.full_layer + k.decode_group * len(groups) + (k.decode_gather if gathers else 0)
                + k.split_part * sum(splits) + (k.split_merge if splits else 0)
                + k.prefill * prefills + k.gathered_prefill * self.gathered_prefills(work)
                + (k.attention_cat if calls > 1 else 0))
        total = (self.num_full * full + k.fixed + k.state_copy * len(work.state_copy_bytes)
                 + sum(self.copies(n) for n in work.copy_batch_sizes)
                 + len(work.swap_tokens) * (self.num_full * k.swap + 1))
        mixed = k.attention_cat if prefills + (1 if work.num_decodes else 0) > 1 else 0
        if self.num_sliding:
            sliding = (k.sliding_layer + k.sliding_prefill * prefills
                       + k.sliding_cached_prefill * sum(c > 0 for c in cached)
                       + (k.sliding_decode if work.num_decodes else 0) + mixed)
            total += self.num_sliding * sliding
        if self.num_ssm:
            ssm = (k.ssm_layer + k.ssm_prefill * prefills
                   + sum(k.ssm_prefill_continued if c > 0 else (k.ssm_prefill_short if t < self.ssm_d_conv else 0)
                         for t, c in zip(work.prefill_new_tokens, cached))
                   + (k.ssm_decode if work.num_decodes else 0) + mixed)
            total += self.num_ssm * ssm
        return total

    def attention_calls(self, work: StepWork) -> int:
        """Attention calls among ``kernels``: per full layer one a decode group, split read's
        part and prefill; per sliding layer one a prefill and one for every decode."""
        prefills = len(work.prefill_new_tokens)
        full = len(work.decode_group_sizes) + sum(work.decode_split_parts) + prefills
        sliding = prefills + (1 if work.num_decodes else 0)
        return self.num_full * full + self.num_sliding * sliding
