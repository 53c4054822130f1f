"""Ops each forward dispatches, per architecture and layer kind: the step-cost function's
launch counts (emulator/cost_model.py charges each one ``launch_overhead``).

Counted, not estimated: tests/test_kernel_counts.py and tests/test_cost_model_kinds.py run the
real forwards (qwen2.py with window_attention.py, gemma3.py, bamba.py with mamba2.py) under a
TorchDispatchMode and hold these numbers to what they dispatch (views excluded), so a change
to a forward that adds or removes an op fails there until the table follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from odma_mlu.engine.step_work import SPLIT_MERGE_KERNELS

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
