"""The kernel table (emulator/kernel_counts.py) against what the Qwen2 forward dispatches:
every non-view aten op, and the attention calls among them, counted under a
TorchDispatchMode on a real forward of a tiny model (tests/test_cost_model_kinds.py does
the same for every architecture and layer kind)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import pytest

from emulator.cost_model import CostModel
from emulator.profile import load_profile
from odma_mlu.engine.step_work import StepWork, ViewRule


class Dispatched(NamedTuple):
    kernels: int
    """Non-view aten ops (what the cost model calls kernels)."""
    attention_calls: int
    """Of them, attention kernels (SDPA, and the flash kernel a split read's part calls)."""


def assert_counts_match(cm: CostModel, work: StepWork, counted: Dispatched, what: str = "") -> None:
    """The cost model's kernels and attention calls for ``work`` are what the forward dispatched."""
    assert cm.num_kernels(work) == counted.kernels, (
        f"{what}: the forward dispatches {counted.kernels} ops, the cost model counts {cm.num_kernels(work)}; "
        "update FORWARD_KERNELS in emulator/kernel_counts.py")
    assert cm.num_attention_calls(work) == counted.attention_calls, (
        f"{what}: the forward makes {counted.attention_calls} attention calls, the cost model counts "
        f"{cm.num_attention_calls(work)} (CostModel.num_attention_calls)")


VIEW_OPS = {"view", "slice", "transpose", "unsqueeze", "as_strided", "expand", "select", "t", "split", "chunk",
            "alias", "_unsafe_view", "reshape", "permute", "narrow", "detach", "_reshape_alias", "squeeze"}
"""Ops that only make views: not kernels."""


def count_dispatched(run: Callable[[], object]) -> Dispatched:
    """The non-view aten ops ``run`` dispatches, and the attention calls among them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            if name not in VIEW_OPS:
                Count.n += 1
                Count.calls += "scaled_dot_product" in name
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Dispatched(Count.n, Count.calls)


def _count_forward_kernels(model: Any, seqs: list, arena_tokens: int = 4096, extra: tuple = (),
                           views: ViewRule | None = None) -> Dispatched:
    """Ops one forward dispatches, and its attention calls;
    ``extra``: the forward's arguments after the arena (rings, or states and their slots);
    ``views``: the batch's (``ForwardBatch.build``)."""
    from odma_mlu.models.attention import ForwardBatch

    batch = ForwardBatch.build(seqs, device=model.device, views=views)
    arena = model.new_arena(max(arena_tokens, 64))
    return count_dispatched(lambda: model.forward(batch, arena, *extra))


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
    assert_counts_match(cm, work, counted, "qwen2")


def test_kernel_count_of_a_lone_view(tiny_model_dir: Any) -> None:
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import SequenceInput
    from odma_mlu.models.loader import load_model

    model, spec, _ = load_model(tiny_model_dir, with_tokenizer=False)
    loc = KVLocation(((100, 300),))
    counted = _count_forward_kernels(model, [SequenceInput((5,), 99, loc)], 400)
    cm = CostModel(load_profile("cpu-host"), spec)
    assert_counts_match(cm, StepWork.build((), [loc.run_tokens(100)]), counted, "a lone view")


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
    counted = _count_forward_kernels(model, seqs, arena_tokens, views=ViewRule(2))
    work = StepWork.build([10], reads, views=ViewRule(2))
    assert work.decode_split_parts == (4, 2) and work.decode_split_rests == 1
    cm = CostModel(load_profile("cpu-host"), spec)
    assert_counts_match(cm, work, counted, "split reads")
