"""The kernel table (emulator/kernel_counts.py) against what the Qwen2 forward dispatches:
every non-view aten op counted under a TorchDispatchMode on a real forward of a tiny model
(tests/test_cost_model_kinds.py does the same for every architecture and layer kind)."""

from __future__ import annotations

from typing import Any

import pytest

from emulator.cost_model import CostModel
from emulator.profile import load_profile
from odma_mlu.engine.step_work import StepWork


def _count_forward_kernels(model: Any, seqs: list, arena_tokens: int = 4096, extra: tuple = (),
                           view_min_tokens: int | None = None) -> int:
    """Non-view aten ops one forward dispatches (what the cost model calls kernels);
    ``extra``: the forward's arguments after the arena (rings, or states and their slots);
    ``view_min_tokens``: the batch's (``ForwardBatch.build``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from odma_mlu.models.attention import ForwardBatch

    views = {"view", "slice", "transpose", "unsqueeze", "as_strided", "expand", "select", "t", "split", "chunk",
             "alias", "_unsafe_view", "reshape", "permute", "narrow", "detach", "_reshape_alias", "squeeze"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__ not in views:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    batch = ForwardBatch.build(seqs, device=model.device, view_min_tokens=view_min_tokens)
    arena = model.new_arena(max(arena_tokens, 64))
    with Count():
        model.forward(batch, arena, *extra)
    return Count.n


@pytest.mark.parametrize("decode_groups, prefills, multi_run", [
    (1, 0, False), (2, 0, False), (0, 1, False), (1, 1, True), (2, 2, True), (3, 1, False)])
def test_kernel_counts_follow_the_forward(tiny_model_dir: Any, decode_groups: int, prefills: int,
                                          multi_run: bool) -> None:
    """The cost model's kernel count equals the ops our Qwen2 forward really dispatches."""
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import SequenceInput
    from odma_mlu.models.loader import load_model

    model, spec, _ = load_model(tiny_model_dir, with_tokenizer=False)
    seqs, reads, prefill_tokens, start = [], [], [], 0
    for g in range(decode_groups):  # one decode group per span class (powers of two)
        ctx = 70 << g
        for _ in range(2):
            if multi_run:
                runs = ((start, 40), (start + 100, 200 << g))
                start += 100 + (200 << g)
            else:
                runs = ((start, 256 << g),)
                start += 256 << g
            loc = KVLocation(runs)
            seqs.append(SequenceInput((5,), ctx - 1, loc))
            reads.append(loc.run_tokens(ctx))
    prefill_runs, prefill_cached = [], []
    for p in range(prefills):  # multi_run: over two runs, the second prefill a later chunk
        cached = 4 if multi_run and p % 2 else 0
        loc = KVLocation(((start, 6), (start + 20, 44)) if multi_run else ((start, 64),))
        seqs.append(SequenceInput(tuple(range(3, 13)), cached, loc))
        prefill_tokens.append(10)
        prefill_cached.append(cached)
        prefill_runs.append(loc.run_tokens(cached + 10))
        start += 64
    counted = _count_forward_kernels(model, seqs, start)
    cm = CostModel(load_profile("cpu-host"), spec)
    work = StepWork.build(prefill_tokens, reads, prefill_cached_tokens=prefill_cached, prefill_read_runs=prefill_runs)
    assert cm.num_kernels(work) == counted, (
        f"the forward dispatches {counted} ops; update the KERNELS_* constants in emulator/kernel_counts.py")


def test_kernel_count_of_a_lone_view(tiny_model_dir: Any) -> None:
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import SequenceInput
    from odma_mlu.models.loader import load_model

    model, spec, _ = load_model(tiny_model_dir, with_tokenizer=False)
    loc = KVLocation(((100, 300),))
    counted = _count_forward_kernels(model, [SequenceInput((5,), 99, loc)], 400)
    cm = CostModel(load_profile("cpu-host"), spec)
    assert cm.num_kernels(StepWork.build((), [loc.run_tokens(100)])) == counted


def split_read_step() -> tuple[list, list[tuple[int, ...]], int]:
    """A step with decodes read in parts (one with a gathered part, one padded by a filler),
    a gathered group, a lone view and a prefill, at a view length of 2 tokens."""
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import SequenceInput

    decodes = [(KVLocation(((300, 6), (100, 1), (500, 4), (600, 40))), 15), (KVLocation(((700, 8), (50, 30))), 19),
               (KVLocation(((200, 64),)), 20), (KVLocation(tuple((800 + 2 * j, 1) for j in range(30))), 17)]
    seqs = [SequenceInput((5,), ctx, loc) for loc, ctx in decodes]
    seqs.append(SequenceInput(tuple(range(3, 13)), 0, KVLocation(((900, 64),))))
    return seqs, [loc.run_tokens(ctx + 1) for loc, ctx in decodes], 1024


def test_kernel_count_of_split_reads(tiny_model_dir: Any) -> None:
    """Decodes read in parts: one attention call a part and the merge, counted from the forward."""
    from odma_mlu.models.loader import load_model

    model, spec, _ = load_model(tiny_model_dir, with_tokenizer=False)
    seqs, reads, arena_tokens = split_read_step()
    counted = _count_forward_kernels(model, seqs, arena_tokens, view_min_tokens=2)
    work = StepWork.build([10], reads, view_min_tokens=2)
    assert work.decode_split_parts == (4, 2) and work.decode_split_rests == 1
    cm = CostModel(load_profile("cpu-host"), spec)
    assert cm.num_kernels(work) == counted, (
        f"the forward dispatches {counted} ops; update the split kernels in emulator/kernel_counts.py")
