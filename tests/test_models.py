"""Our Qwen2 forward against transformers, on contiguous and paged KV (the loader's errors:
test_model_loader_errors.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from odma_mlu.engine.step_work import ViewRule, decode_group_key
from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.models.attention import ForwardBatch, SequenceInput
from odma_mlu.models.loader import load_model
from tiny_model import greedy_generate, make_tiny_qwen2

PROMPTS = [
    "hello",
    "the model can serve a request",
    "what is the length of this story about a family and their house in the city",
    "cache memory slab bucket token model serve request length predict contiguous page block "
    "the world of people and their work in a small town, each year a new school opens",
]
MAX_NEW = 12
PAGE = 4


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    model, spec, tokenizer = load_model(tiny_model_dir, dtype="float32")
    return model, spec, tokenizer


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(loaded) -> list[list[int]]:
    tokenizer = loaded[2]
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompt_ids) -> list[list[int]]:
    """transformers generate(do_sample=False), one prompt at a time (no padding effects)."""
    outs = []
    for ids in prompt_ids:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=MAX_NEW, do_sample=False)
        outs.append(out[0, len(ids):].tolist())
    assert sum(map(len, outs)) > 3 * MAX_NEW, "the reference should mostly run to max_new_tokens"
    return outs


def assert_same_greedy(ours: list[list[int]], reference: list[list[int]], eos_id: int = 2) -> None:
    """Token-for-token equal; where generate stopped at eos, ours (which ignores eos) agrees up to it."""
    for i, (mine, ref) in enumerate(zip(ours, reference, strict=True)):
        assert mine[:len(ref)] == ref, f"prompt {i}: ours {mine} vs transformers {ref}"
        assert len(ref) == len(mine) or ref[-1] == eos_id, f"prompt {i}: transformers stopped early without eos"


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def contiguous_locations(lengths: list[int], capacities: list[int], gaps: list[int] | None = None) -> list[KVLocation]:
    """Slabs in order, ``gaps[i]`` free slots after slab i.

    Without gaps they are back to back, so equal capacities are evenly spaced (strided view).
    """
    locs, start = [], 3
    for i, cap in enumerate(capacities):
        locs.append(KVLocation(((start, cap),)))
        start += cap + (gaps[i] if gaps else 0)
    assert all(n <= c for n, c in zip(lengths, capacities))
    return locs


def paged_locations(capacities: list[int], seed: int = 0) -> list[KVLocation]:
    """Scattered, non-monotone block tables drawn from a shuffled page pool."""
    pages_per = [c // PAGE for c in capacities]
    pool = torch.randperm(sum(pages_per) + 7, generator=torch.Generator().manual_seed(seed)).tolist()
    locs = []
    for n in pages_per:
        table, pool = tuple(pool[:n]), pool[n:]
        locs.append(KVLocation.from_pages(table, PAGE))
    return locs


def test_prefill_and_decode_logits_match_transformers(loaded, hf_model, prompt_ids):
    model = loaded[0]
    ids = prompt_ids[3]
    ref = hf_logits(hf_model, ids)
    table = tuple(torch.randperm(40, generator=torch.Generator().manual_seed(1))[:32].tolist())
    for loc in (KVLocation(((5, 128),)), KVLocation.from_pages(table, PAGE)):
        arena = model.new_arena(160)
        split = len(ids) - 6
        out = model.forward(ForwardBatch.build([SequenceInput(tuple(ids[:split]), 0, loc)]), arena)
        torch.testing.assert_close(out[0], ref[split - 1], atol=1e-4, rtol=0)
        for pos in range(split, len(ids)):
            out = model.forward(ForwardBatch.build([SequenceInput((ids[pos],), pos, loc)]), arena)
            torch.testing.assert_close(out[0], ref[pos], atol=1e-4, rtol=0)


@pytest.mark.parametrize("paged", [False, True])
def test_chunked_prefill_logits_match(loaded, hf_model, prompt_ids, paged):
    model = loaded[0]
    ids = prompt_ids[2]
    ref = hf_logits(hf_model, ids)
    arena = model.new_arena(64)
    loc = KVLocation.from_pages(tuple(range(9, -1, -1)), 4) if paged else KVLocation(((17, 40),))
    done = 0
    for chunk in (5, 1, 7, len(ids)):
        part = ids[done:done + chunk]
        if not part:
            break
        out = model.forward(ForwardBatch.build([SequenceInput(tuple(part), done, loc)]), arena)
        done += len(part)
        torch.testing.assert_close(out[0], ref[done - 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["contiguous_even", "contiguous_uneven", "paged", "runs"])
def test_batched_greedy_matches_generate(loaded, prompt_ids, hf_greedy, layout):
    """Four prompts, staggered starts (prefill + decode in one batch), two of them in the same bucket."""
    model = loaded[0]
    lengths = [len(p) + MAX_NEW for p in prompt_ids]
    if layout == "paged":
        locs = paged_locations([16, 32, 48, 128])
    elif layout == "runs":  # ODMA's multi-run placements: uneven runs, out of address order
        locs = [KVLocation(((300, 5), (20, 11), (200, 40))), KVLocation(((100, 33), (0, 20))),
                KVLocation(((140, 60),)), KVLocation(((250, 50), (40, 60), (320, 20)))]
    elif layout == "contiguous_even":  # buckets 32 (2 seqs, evenly spaced: strided view), 64, 128
        locs = contiguous_locations(lengths, [32, 32, 64, 128])
    else:  # bucket 64 holds 3 unevenly spaced seqs: a stack of slabs
        locs = contiguous_locations(lengths, [64, 64, 64, 128], gaps=[0, 7, 0, 0])
    arena = model.new_arena(340)
    ours = greedy_generate(model, arena, prompt_ids, locs, MAX_NEW, start_steps=[0, 2, 2, 5])
    assert_same_greedy(ours, hf_greedy)


def test_decode_reads_a_lone_run_as_a_view_and_gathers_otherwise(loaded, prompt_ids):
    """A lone one-run sequence is a view of the arena; groups and multi-run sequences gather."""
    lone = ForwardBatch.build([SequenceInput((1,), 40, KVLocation(((7, 64),)))])
    (group,) = lone.decode_groups
    assert group.view_start == 7 and group.gather_offset is None and group.length_mask is None
    assert lone.decode_gather_slots is None, "a step of views gathers nothing"
    multi = KVLocation(((100, 20), (10, 30)))
    batch = ForwardBatch.build([SequenceInput((1,), 4, KVLocation(((0, 32),))),
                                SequenceInput((2,), 24, multi), SequenceInput((3,), 1, KVLocation(((60, 32),)))])
    (group,) = batch.decode_groups  # contexts 5, 25, 2: one span class
    assert group.view_start is None and group.span_tokens == 25
    assert group.gather_offset == 0 and batch.decode_gather_slots is not None
    slots = batch.decode_gather_slots.view(3, 25)
    assert slots[1].tolist() == list(range(100, 120)) + list(range(10, 15))
    assert slots[0, :5].tolist() == [0, 1, 2, 3, 4] and slots[2, :2].tolist() == [60, 61]
    assert group.length_mask.view(3, 25).sum(1).tolist() == [5, 25, 2]
    assert batch.write_slots.tolist() == [4, multi.slot_of(24), 61]
    # and the gathered multi-run read attends exactly like a one-run copy of the same KV
    model = loaded[0]
    arena = model.new_arena(400)
    ids = tuple(prompt_ids[1][:25])
    one = KVLocation(((200, 25),))
    outs = []
    for loc in (one, multi):
        model.forward(ForwardBatch.build([SequenceInput(ids[:-1], 0, loc)]), arena)
        outs.append(model.forward(ForwardBatch.build([SequenceInput(ids[-1:], 24, loc)]), arena))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_gathered_groups_share_one_gather_laid_end_to_end(loaded, prompt_ids):
    """Each gathered group's B x L slots lie at its ``gather_offset`` in the step's one gather
    (``decode_gather_slots``), in group order; a view group takes none; and the logits match
    each sequence run alone."""
    model = loaded[0]
    arena = model.new_arena(1024)
    ids = [tuple(prompt_ids[i]) for i in range(4)]
    locs = [KVLocation(((0, 64),)), KVLocation(((64, 64),)), KVLocation(((300, 10), (500, 200))),
            KVLocation(((200, 96),))]
    for seq_ids, loc in zip(ids, locs):
        model.forward(ForwardBatch.build([SequenceInput(seq_ids, 0, loc)]), arena)
    # contexts: two in the 64 class (gathered together), a two-run read of 80 (gathered
    # alone, class 80) and a lone one-run read of 91 (class 96: a view)
    ctx = [len(ids[0]), len(ids[1]), 79, 90]
    pieces = [(ids[0][-1],), (ids[1][-1],), (7,), (9,)]
    if ctx[0] > 63 or ctx[1] > 63:
        pytest.skip("prompts longer than one span class")
    seqs = [SequenceInput(p, c, loc) for p, c, loc in zip(pieces, ctx, locs)]
    batch = ForwardBatch.build(seqs)
    assert [decode_group_key(c + 1) for c in ctx] == [64, 64, 80, 96]
    gathered = [g for g in batch.decode_groups if g.view_start is None]
    assert [(g.num_seqs, g.span_tokens) for g in gathered] == [(2, max(ctx[:2]) + 1), (1, 80)]
    assert [g.gather_offset for g in gathered] == [0, 2 * (max(ctx[:2]) + 1)]
    assert batch.decode_gather_slots is not None and batch.decode_gather_slots.numel() == 2 * (max(ctx[:2]) + 1) + 80
    tail = batch.decode_gather_slots[gathered[1].gather_offset:]
    assert tail.tolist() == [locs[2].slot_of(t) for t in range(80)]
    together = model.forward(batch, arena)
    for i, seq in enumerate(seqs):
        alone = model.forward(ForwardBatch.build([seq]), arena)
        assert torch.allclose(together[i], alone[0], atol=1e-5), f"sequence {i} differs when batched"


def test_the_inlined_span_class_is_decode_group_key() -> None:
    """``ForwardBatch.build`` inlines ``decode_group_key`` on its hot path: the same classes."""
    contexts = list(range(2, 300)) + [511, 512, 513, 1000, 1024, 1025, 1152, 1153, 4097, 32768]
    seqs = [SequenceInput((1,), c - 1, KVLocation(((100_000 * i, 40_000),))) for i, c in enumerate(contexts)]
    batch = ForwardBatch.build(seqs)
    by_group = {tuple(sorted(batch.decode_seqs[g.first_row - batch.decode_rows.start + k] for k in range(g.num_seqs)))
                for g in batch.decode_groups}
    expected: dict[int, list[int]] = {}
    for i, c in enumerate(contexts):
        expected.setdefault(decode_group_key(c), []).append(i)
    assert by_group == {tuple(v) for v in expected.values()}


def test_rows_are_laid_out_by_attention_call(loaded, prompt_ids):
    """Prefill rows first, then each decode group's rows together (one slice per attention
    call, outputs concatenated); the logits come back in ``seqs`` order and do not depend
    on the order the sequences are given in, nor on which others share the step."""
    model = loaded[0]
    arena = model.new_arena(1024)
    pa, pb, pc, pd = (tuple(prompt_ids[i]) for i in (0, 1, 3, 2))
    la, lb, lc = len(pa), len(pb), len(pc)
    loc_a, loc_b, loc_d = KVLocation(((0, 64),)), KVLocation(((100, 64),)), KVLocation(((400, 128),))
    loc_c = KVLocation(((300, 10), (200, 90)))  # its decode reads two runs
    model.forward(ForwardBatch.build([SequenceInput(pa, 0, loc_a), SequenceInput(pb, 0, loc_b),
                                      SequenceInput(pc, 0, loc_c)]), arena)
    seqs = [SequenceInput((5,), la, loc_a), SequenceInput(pd, 0, loc_d), SequenceInput((6,), lb, loc_b),
            SequenceInput((7,), lc, loc_c)]
    batch = ForwardBatch.build(seqs, views=ViewRule(lb))  # b (one run, lb + 1 tokens) is read alone
    assert batch.seq_rows[1] == 0 and len(batch.prefills) == 1 and batch.prefills[0].token_offset == 0
    assert batch.last_token_rows.tolist() == [r + len(s.token_ids) - 1 for r, s in zip(batch.seq_rows, seqs)]
    rows = [r for g in batch.decode_groups for r in range(g.first_row, g.first_row + g.num_seqs)]
    assert rows == list(range(len(pd), len(pd) + 3)), "decode groups tile the rows after the prefill"
    assert sorted(batch.seq_rows[i] for i in (0, 2, 3)) == rows
    for seq, row in zip(seqs, batch.seq_rows):
        n = len(seq.token_ids)
        assert batch.input_ids[row:row + n].tolist() == list(seq.token_ids)
        assert batch.positions[row:row + n].tolist() == list(range(seq.num_cached_tokens, seq.num_total_tokens))
        assert batch.write_slots[row:row + n].tolist() == [seq.location.slot_of(t) for t in
                                                          range(seq.num_cached_tokens, seq.num_total_tokens)]
    together = model.forward(batch, arena)
    backwards = model.forward(ForwardBatch.build(seqs[::-1], views=ViewRule(lb)), arena)
    assert torch.allclose(together, backwards.flip(0), atol=1e-5)
    for i, seq in enumerate(seqs):  # the same K/V is written again: each alone gives the same logits
        alone = model.forward(ForwardBatch.build([seq]), arena)
        assert torch.allclose(together[i], alone[0], atol=1e-5), f"sequence {i} differs when batched"


def test_a_one_token_prompt_is_a_prefill(loaded, hf_model, prompt_ids):
    """A one-token prompt is prefilled (as the scheduler and the step-cost function count it),
    not put in a decode group, and matches transformers beside a decode."""
    model = loaded[0]
    arena = model.new_arena(512)
    ids = tuple(prompt_ids[1])
    model.forward(ForwardBatch.build([SequenceInput(ids, 0, KVLocation(((0, 64),)))]), arena)
    token = prompt_ids[2][0]
    batch = ForwardBatch.build([SequenceInput((ids[-1],), len(ids), KVLocation(((0, 64),))),
                                SequenceInput((token,), 0, KVLocation(((100, 16),)))])
    assert [(p.token_offset, p.num_new_tokens) for p in batch.prefills] == [(0, 1)]
    assert [g.num_seqs for g in batch.decode_groups] == [1] and batch.seq_rows == (1, 0)
    ours = model.forward(batch, arena)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([[token]])).logits[0, -1].float()
    torch.testing.assert_close(ours[1], theirs, atol=2e-4, rtol=1e-4)


def test_chunked_prefill_greedy_matches_generate(loaded, prompt_ids, hf_greedy):
    model = loaded[0]
    locs = paged_locations([128] * 4, seed=3)
    ours = greedy_generate(model, model.new_arena(560), prompt_ids, locs, MAX_NEW, prefill_chunk_tokens=6)
    assert_same_greedy(ours, hf_greedy)


def test_moving_kv_mid_generation_keeps_output(loaded, prompt_ids, hf_greedy):
    """ODMA's migration: a sequence's KV is copied to a larger slab (one range copy) mid-decode."""
    model = loaded[0]
    arena = model.new_arena(400)
    locs = contiguous_locations([], [32, 32, 64, 128])

    def migrate(step: int, locations: list[KVLocation]) -> None:
        if step == 6:
            old, new = locations[1], KVLocation(((290, 96),))
            n = len(prompt_ids[1]) + (6 - 2) - 1  # cached after its steps 2..5: prompt + 3 decodes
            arena.copy_run(old.start_slot, new.start_slot, n)
            arena.take_issued_copies()  # the step's copies run (the engine does this before the forward)
            arena.k[0][old.start_slot:old.start_slot + old.capacity_tokens] = float("nan")  # the old slab is dead
            locations[1] = new

    ours = greedy_generate(model, arena, prompt_ids, locs, MAX_NEW, start_steps=[0, 2, 2, 5], on_step=migrate)
    assert_same_greedy(ours, hf_greedy)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_smoke(tiny_model_dir, prompt_ids, dtype):
    model, spec, _ = load_model(tiny_model_dir, dtype=dtype, with_tokenizer=False)
    assert model.dtype == getattr(torch, dtype) and spec.dtype == dtype
    lengths = [len(p) + 6 for p in prompt_ids]
    contiguous = greedy_generate(model, model.new_arena(520), prompt_ids,
                                 contiguous_locations(lengths, [128] * 4), 6, start_steps=[0, 1, 1, 3])
    paged = greedy_generate(model, model.new_arena(560), prompt_ids, paged_locations([128] * 4), 6,
                            start_steps=[0, 1, 1, 3])
    assert contiguous == paged
    logits = model.forward(ForwardBatch.build([SequenceInput(tuple(prompt_ids[2]), 0, KVLocation(((0, 64),)))]),
                           model.new_arena(64))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_sharded_folder_loads_the_same_weights(loaded, tiny_sharded_model_dir, prompt_ids):
    assert (tiny_sharded_model_dir / "model.safetensors.index.json").is_file()
    sharded, spec, tok = load_model(tiny_sharded_model_dir)
    assert spec == dataclasses.replace(loaded[1], name=spec.name)
    batch = ForwardBatch.build([SequenceInput(tuple(prompt_ids[1]), 0, KVLocation(((0, 32),)))])
    expected = loaded[0].forward(batch, loaded[0].new_arena(32))
    torch.testing.assert_close(sharded.forward(batch, sharded.new_arena(32)), expected, atol=0, rtol=0)


def test_tied_embeddings_match_transformers(tmp_path, prompt_ids):
    from transformers import Qwen2ForCausalLM

    folder = make_tiny_qwen2(tmp_path / "tied", num_layers=1, tie_word_embeddings=True, rope_theta=50000.0)
    model, spec, _ = load_model(folder, with_tokenizer=False)
    assert spec.tie_word_embeddings and spec.rope_theta == 50000.0 and model.lm_head is model.embed
    hf = Qwen2ForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = prompt_ids[3]
    out = model.forward(ForwardBatch.build([SequenceInput(tuple(ids), 0, KVLocation(((0, 128),)))]),
                        model.new_arena(128))
    torch.testing.assert_close(out[0], hf_logits(hf, ids)[-1], atol=1e-4, rtol=0)


# ---- loader errors: each raised before weights are read, naming the file or the numbers ----


def test_rotary_cache_grows_to_the_same_values():
    from odma_mlu.models.qwen2 import RotaryCache

    small = RotaryCache(16, 1e4, torch.device("cpu"), torch.float32, initial_positions=8)
    big = RotaryCache(16, 1e4, torch.device("cpu"), torch.float32, initial_positions=256)
    positions = torch.tensor([0, 7, 8, 100, 200])
    for a, b in zip(small.lookup(positions, 200), big.lookup(positions, 200)):
        assert torch.equal(a, b)
    assert small.cos.shape[0] >= 201
