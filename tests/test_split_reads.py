"""Decodes read in parts (odma_mlu/models/split_reads.py): logits equal to each sequence read
gathered whole, the plain-ops log-sum-exp path equal to the fused kernel, and the engine's
choice equal to ``StepWork.build``'s (the one rule, ``step_work.ViewRule``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from odma_mlu.engine.step_work import SPLIT_MERGE_KERNELS, StepWork, ViewRule
from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.models.attention import ForwardBatch, SequenceInput
from odma_mlu.models.loader import load_model


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(tiny_model_dir, dtype="float32")


def test_split_reads_attend_like_whole_reads(loaded):
    """Decodes over several runs whose runs reach the view length are read in parts (those
    runs in place, the shorter ones gathered as one part) and merged by log-sum-exp, beside
    a lone view and a gathered group in the same step: each sequence's logits match its read
    gathered whole (no view length), and a sequence with fewer parts is padded by a filler."""
    model, spec, _ = loaded
    arena = model.new_arena(1024)
    gen = torch.Generator().manual_seed(3)
    locs = [KVLocation(((300, 6), (100, 1), (500, 4), (600, 40))),  # 3 runs in place + 1 gathered
            KVLocation(((700, 8), (50, 30))),  # 2 in place
            KVLocation(((200, 64),)),  # one run: a view
            KVLocation(tuple((800 + 2 * j, 1) for j in range(30)))]  # runs of 1: gathered whole
    contexts = [15, 19, 20, 17]
    for loc, ctx in zip(locs, contexts):
        prompt = tuple(torch.randint(0, spec.vocab_size, (ctx,), generator=gen).tolist())
        model.forward(ForwardBatch.build([SequenceInput(prompt, 0, loc)]), arena)
    seqs = [SequenceInput((5 + i,), ctx, loc) for i, (loc, ctx) in enumerate(zip(locs, contexts))]
    batch = ForwardBatch.build(seqs, views=ViewRule(2))
    split = batch.split_reads
    assert split is not None and split.num_seqs == 2 and split.num_parts == 4
    assert [batch.decode_seqs[split.first_row - batch.decode_rows.start + k] for k in range(2)] == [0, 1]
    group_slots = 18  # the gathered group's 17 + 1 tokens come first in the gather buffer
    assert split.parts == ((0, 300, 6), (0, 700, 8), (0, 500, 4), (0, 50, 12), (0, 600, 5), None,
                           (1, group_slots, 1), None)
    assert split.filler_lse is not None and batch.decode_gather_slots is not None
    assert batch.decode_gather_slots[group_slots:].tolist() == [100]
    assert [(g.num_seqs, g.view_start) for g in batch.decode_groups] == [(1, 200), (1, None)]
    assert batch.write_slots[split.first_row:split.rows.stop].tolist() == [locs[0].slot_of(15), locs[1].slot_of(19)]
    together = model.forward(batch, arena)
    for i, seq in enumerate(seqs):
        alone = model.forward(ForwardBatch.build([seq]), arena)
        assert torch.allclose(together[i], alone[0], atol=1e-5), f"sequence {i} differs read in parts"
    # Without the gain (a view length no run reaches), every multi-run decode is gathered whole.
    assert ForwardBatch.build(seqs, views=ViewRule(41)).split_reads is None


def test_split_reads_follow_the_step_works_rule() -> None:
    """``ForwardBatch.build`` and ``StepWork.build`` choose the same decodes to read in parts, with
    the same parts, over random multi-run layouts; a step whose gains do not cover the merge
    (``SPLIT_MERGE_KERNELS``) reads none in parts."""
    import random


    rng = random.Random(5)
    steps_with_splits = 0
    for _ in range(200):
        seqs, reads, start = [], [], 0
        for _ in range(rng.randint(1, 6)):
            runs = []
            for _ in range(rng.randint(1, 4)):
                n = rng.choice([1, 3, 8, 20, 40])
                runs.append((start, n))
                start += n + rng.randint(0, 5)
            loc = KVLocation(tuple(runs))
            ctx = rng.randint(max(1, loc.capacity_tokens - 10), loc.capacity_tokens - 1) if loc.capacity_tokens > 1 else 0
            if ctx == 0:
                continue
            seqs.append(SequenceInput((1,), ctx, loc))
            reads.append(loc.run_tokens(ctx + 1))
        if not seqs:
            continue
        rule = ViewRule(rng.choice([4, 8, 16]))
        work = StepWork.build((), reads, views=rule)
        split = ForwardBatch.build(seqs, views=rule).split_reads
        got = () if split is None else tuple(
            sum(split.parts[p * split.num_seqs + s] is not None for p in range(split.num_parts))
            for s in range(split.num_seqs))
        assert got == work.decode_split_parts
        gains = [rule.split_gain(r) for r in reads]
        assert bool(got) == (sum(g for g in gains if g > 0) > SPLIT_MERGE_KERNELS)
        assert sum(work.decode_group_sizes) + len(got) == len(reads)
        steps_with_splits += bool(got)
    assert 20 < steps_with_splits < 180, f"{steps_with_splits} of 200 steps read decodes in parts"


@pytest.mark.parametrize("dtype, kernels", [(torch.float16, 8), (torch.float32, 6)])
def test_plain_lse_kernels_are_counted(dtype: torch.dtype, kernels: int) -> None:
    """A part in plain ops dispatches ``PLAIN_LSE_KERNELS`` ops in half precision (what an
    engine without a fused kernel prices it at) and two fewer in float32; fused, one."""
    from odma_mlu.models.split_reads import PLAIN_LSE_KERNELS, attention_with_lse
    from test_kernel_counts import count_dispatched

    cache = torch.randn(300, 4, 128).to(dtype)
    q, k = torch.randn(1, 4, 7, 128).to(dtype), cache[10:210].unsqueeze(0).transpose(1, 2)
    for fused, expected in ((False, kernels), (True, 1)):
        ops = count_dispatched(lambda: attention_with_lse(q, k, k, 0.088, fused=fused)).kernels
        assert ops == expected, f"fused={fused}: {ops} ops"
    assert PLAIN_LSE_KERNELS == 8


def test_the_fused_kernel_is_probed_before_it_is_used() -> None:
    """Off the CPU the fused kernel is used only where a probe finds it gives the plain ops'
    output and log-sum-exp; a device where it cannot run (here: no CUDA in this build, and
    the data-less meta device) falls back to the plain ops, which the engine then prices."""
    from odma_mlu.models.split_reads import fused_lse_works, has_fused_lse

    assert has_fused_lse("cpu", torch.float16, 100)
    assert fused_lse_works("cpu", torch.float32, 64) and fused_lse_works("cpu", torch.float16, 128)
    assert not fused_lse_works("meta", torch.float16, 64)
    if not torch.cuda.is_available():
        assert not has_fused_lse("cuda", torch.float16, 128)


@pytest.mark.cuda
def test_attention_with_lse_fused_on_cuda_matches_plain_ops() -> None:
    """The CUDA flash kernel's output and log-sum-exp (half precision, strided views of an
    arena) against the plain ops; run by tools/gpu_check.sh."""
    from odma_mlu.models.split_reads import attention_with_lse, has_fused_lse

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(0)
    cache_k = torch.randn(400, 4, 128, generator=gen).to("cuda", torch.float16)
    cache_v = torch.randn(400, 4, 128, generator=gen).to("cuda", torch.float16)
    q = torch.randn(1, 4, 7, 128, generator=gen).to("cuda", torch.float16)
    k = cache_k[37:237].unsqueeze(0).transpose(1, 2)
    v = cache_v[37:237].unsqueeze(0).transpose(1, 2)
    assert has_fused_lse("cuda", q.dtype, 128) and not has_fused_lse("cuda", torch.float32, 128)
    fused = attention_with_lse(q, k, v, 128 ** -0.5)
    plain = attention_with_lse(q, k, v, 128 ** -0.5, fused=False)
    assert fused[1].shape == (1, 4, 7) and fused[1].dtype == torch.float32
    torch.testing.assert_close(fused[0], plain[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(fused[1], plain[1], atol=2e-3, rtol=2e-3)


def test_attention_with_lse_plain_ops_match_the_fused_kernel() -> None:
    """The plain-ops path (devices without a fused kernel returning the LSE) gives the CPU
    flash kernel's output and log-sum-exp, over strided views of an arena."""
    from odma_mlu.models.split_reads import attention_with_lse

    gen = torch.Generator().manual_seed(0)
    cache_k, cache_v = torch.randn(400, 2, 16, generator=gen), torch.randn(400, 2, 16, generator=gen)
    q = torch.randn(1, 2, 3, 16, generator=gen)
    k = cache_k[37:237].unsqueeze(0).transpose(1, 2)
    v = cache_v[37:237].unsqueeze(0).transpose(1, 2)
    fused = attention_with_lse(q, k, v, 0.25, fused=True)
    plain = attention_with_lse(q, k, v, 0.25, fused=False)
    torch.testing.assert_close(fused[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], atol=1e-5, rtol=1e-5)
    expected = torch.logsumexp(0.25 * q @ k.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(fused[1], expected, atol=1e-5, rtol=1e-5)
