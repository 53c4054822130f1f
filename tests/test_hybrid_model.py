"""Bamba (Mamba2 + attention) forward: greedy output equals transformers' generate, batched,
over contiguous and paged KV, with chunked prefill, and after a preemption (the SSM state
recomputed from prompt + generated tokens in a fresh slot)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.models.attention import ForwardBatch, SequenceInput
from odma_mlu.models.bamba import BambaForwardModel
from odma_mlu.models.loader import ModelFolderError, load_model
from tiny_hybrid import make_tiny_bamba

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 3, 44, 55, 66, 77, 88, 99, 100, 101, 17, 18, 19],  # 3 scan chunks
    [7],
    [9, 10, 11],
    [200, 201, 202, 203, 204, 205, 206, 207, 208],
]
MAX_NEW = 14
SLOT_TOKENS = 64


def run_location(runs: list[tuple[int, int]], page_tokens: int = 0) -> KVLocation:
    """A KVLocation from (start, tokens) runs, under either KVLocation API (runs, or start/block table)."""
    if "runs" in KVLocation.__dataclass_fields__:
        return KVLocation(tuple(runs))  # type: ignore[call-arg]
    if len(runs) == 1:
        return KVLocation(capacity_tokens=runs[0][1], start_slot=runs[0][0])  # type: ignore[call-arg]
    return KVLocation(capacity_tokens=sum(n for _, n in runs),  # type: ignore[call-arg]
                      block_table=tuple(s // page_tokens for s, _ in runs), page_tokens=page_tokens)


@pytest.fixture(scope="module")
def bamba_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bamba(tmp_path_factory.mktemp("tiny_bamba"))


@pytest.fixture(scope="module")
def model(bamba_dir: Path) -> BambaForwardModel:
    m, _, _ = load_model(bamba_dir, with_tokenizer=False)
    assert isinstance(m, BambaForwardModel)
    return m


@pytest.fixture(scope="module")
def reference(bamba_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(bamba_dir, local_files_only=True, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


def drive(model: BambaForwardModel, locations: list[KVLocation], *, start_steps: list[int] | None = None,
          chunk_tokens: int | None = None, preempt_at: dict[int, int] | None = None) -> list[list[int]]:
    """Greedy decoding of PROMPTS through model.forward, one ForwardBatch per step.

    ``preempt_at[i] = step``: before that step request i loses its KV and state slot and is
    prefilled again (prompt + generated so far) in a different slot, as after a preemption."""
    n = len(PROMPTS)
    arena = model.new_arena(2 * n * SLOT_TOKENS)
    pool = model.new_state_pool(n + 2)
    slots = [pool.allocate(f"r{i}") for i in range(n)]
    start_steps = start_steps or [0] * n
    preempt_at = preempt_at or {}
    tokens = [list(p) for p in PROMPTS]
    cached, generated = [0] * n, [[] for _ in range(n)]  # type: tuple[list[int], list[list[int]]]
    step = 0
    while any(len(g) < MAX_NEW for g in generated):
        rows, seqs = [], []
        for i in range(n):
            if step < start_steps[i] or len(generated[i]) >= MAX_NEW:
                continue
            if preempt_at.get(i) == step:
                pool.free(f"r{i}")
                pool.allocate(f"p{i}")  # a different slot: the old state must not leak in
                slots[i] = pool.allocate(f"r{i}")
                pool.free(f"p{i}")
                cached[i] = 0
            todo = tokens[i][cached[i]:]
            if chunk_tokens is not None and cached[i] < len(PROMPTS[i]):
                todo = todo[:chunk_tokens]
            seqs.append(SequenceInput(tuple(todo), cached[i], locations[i]))
            rows.append(i)
        step += 1
        if not seqs:
            continue
        logits = model.forward(ForwardBatch.build(seqs), arena, pool, [slots[i] for i in rows])
        for row, (i, seq) in enumerate(zip(rows, seqs)):
            cached[i] += seq.num_new_tokens
            if cached[i] == len(tokens[i]):
                nxt = int(logits[row].argmax())
                tokens[i].append(nxt)
                generated[i].append(nxt)
        pool.check_integrity()
    return generated


def contiguous(n: int) -> list[KVLocation]:
    return [run_location([(i * SLOT_TOKENS, SLOT_TOKENS)]) for i in range(n)]


def test_batched_greedy_matches_transformers(model: BambaForwardModel, reference: list[list[int]]) -> None:
    assert drive(model, contiguous(len(PROMPTS))) == reference


def test_staggered_prefill_and_decode_in_one_batch(model: BambaForwardModel, reference: list[list[int]]) -> None:
    assert drive(model, contiguous(len(PROMPTS)), start_steps=[0, 3, 1, 6]) == reference


def test_paged_kv_and_chunked_prefill(model: BambaForwardModel, reference: list[list[int]]) -> None:
    page = 8
    # Interleaved pages: request i owns pages i, i+4, i+8, ... (every read is a gather).
    locs = [run_location([((i + 4 * p) * page, page) for p in range(SLOT_TOKENS // page)], page)
            for i in range(len(PROMPTS))]
    assert drive(model, locs, chunk_tokens=5) == reference


def test_preempted_requests_recompute_state_exactly(model: BambaForwardModel, reference: list[list[int]]) -> None:
    assert drive(model, contiguous(len(PROMPTS)), preempt_at={0: 5, 2: 9, 3: 2}) == reference


def test_logits_close_to_transformers(bamba_dir: Path, model: BambaForwardModel) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(bamba_dir, local_files_only=True, dtype=torch.float32).eval()
    prompt = PROMPTS[0]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1]
    pool = model.new_state_pool(1)
    got = model.forward(ForwardBatch.build([SequenceInput(tuple(prompt), 0, contiguous(1)[0])]),
                        model.new_arena(SLOT_TOKENS), pool, [pool.allocate("r")])[0]
    assert torch.allclose(got, want, atol=1e-4), f"max |diff| {float((got - want).abs().max())}"


def test_loader_names_a_missing_mamba_tensor(bamba_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad_bamba"
    bad.mkdir()
    for f in bamba_dir.iterdir():
        if f.name != "model.safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(bamba_dir / "model.safetensors"))
    del weights["model.layers.0.mamba.A_log"]
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(ModelFolderError, match="model.layers.0.mamba.A_log"):
        load_model(bad, with_tokenizer=False)


def test_loader_reads_tokenizer_and_spec(bamba_dir: Path) -> None:
    m, spec, tok = load_model(bamba_dir)
    assert spec.architecture == "BambaForCausalLM" and spec.num_layers == 4
    assert m.hybrid.attention_layers == (1, 3) and m.hybrid.ssm_layers == (0, 2)
    assert tok is not None and len(tok.encode("hello world")) > 0
