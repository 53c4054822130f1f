"""Sliding-window models (Qwen2 with mixed layer_types, Gemma-3 text) against transformers.

Windows (8 tokens) are shorter than the prompts and than the generation, so every sliding
layer wraps its ring many times; full layers use the arena as Qwen2 does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from odma_mlu.models.loader import load_model
from tiny_hetero import greedy_generate_rings, make_tiny_gemma3, make_tiny_qwen2_sliding, slab

PROMPTS = [
    "hello",
    "the model can serve a request",
    "what is the length of this story about a family and their house in the city",
    "cache memory slab bucket token model serve request length predict contiguous page block "
    "the world of people and their work in a small town",
]
MAX_NEW = 24
WINDOW = 8
FAMILIES = ["qwen2_sliding", "gemma3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "qwen2_sliding": make_tiny_qwen2_sliding(tmp_path_factory.mktemp("q2s"), window=WINDOW),
        "gemma3": make_tiny_gemma3(tmp_path_factory.mktemp("g3"), window=WINDOW),
    }


def _hf(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def _reference(folder: Path, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    hf = _hf(folder)
    out = []
    for ids in prompts:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def loaded(folders: dict[str, Path]) -> dict[str, tuple[Any, list[list[int]], list[list[int]]]]:
    """family -> (our model, prompt ids, transformers' greedy continuation)."""
    out = {}
    _FOLDERS.update(folders)
    for fam, folder in folders.items():
        model, _, tok = load_model(folder, dtype="float32")
        ids = [tok(p)["input_ids"] for p in PROMPTS]
        assert max(map(len, ids)) > 2 * WINDOW, "a prompt should be longer than the window"
        out[fam] = (model, ids, _reference(folder, ids))
    return out


def _setup(model: Any, n: int, capacity: int = 96, gap: int = 5) -> tuple[Any, Any, list[Any], list[int]]:
    arena = model.new_arena(n * (capacity + gap))
    pool = model.new_window_pool(n + 2)
    locations = [slab(i * (capacity + gap), capacity) for i in range(n)]
    return arena, pool, locations, [n + 1 - i for i in range(n)]  # rings in reverse order: slots are not rows


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_groups_from_config(loaded, family: str) -> None:
    model = loaded[family][0]
    assert model.window_tokens == WINDOW
    assert model.num_sliding_layers > 0 and model.num_full_layers > 0
    if family == "gemma3":  # 5 local : 1 global
        assert model.layer_windows == (WINDOW,) * 5 + (None,)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_matches_transformers(loaded, family: str) -> None:
    model, ids, ref = loaded[family]
    arena, pool, locs, rings = _setup(model, len(ids))
    for t in pool.k + pool.v:  # ring entries not yet written must be masked, whatever they hold
        t.fill_(30.0)
    ours = greedy_generate_rings(model, arena, pool, ids, locs, rings, MAX_NEW, start_steps=[0, 3, 0, 7])
    assert ours == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_transformers(loaded, family: str) -> None:
    """Chunks of 5 read the cached part of the window back from the ring."""
    model, ids, ref = loaded[family]
    arena, pool, locs, rings = _setup(model, len(ids))
    assert greedy_generate_rings(model, arena, pool, ids, locs, rings, MAX_NEW, prefill_chunk_tokens=5) == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(loaded, folders, family: str) -> None:
    from odma_mlu.models.attention import ForwardBatch, SequenceInput
    from odma_mlu.models.window_attention import RingBatch

    model, ids, _ = loaded[family]
    hf = _hf(folders[family])
    arena, pool, locs, rings = _setup(model, 1)
    prompt = ids[3]
    seq = SequenceInput(tuple(prompt), 0, locs[0])
    ours = model.forward(ForwardBatch.build([seq]), arena, RingBatch.build(pool, [seq], rings[:1]))
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0, -1].float()
    torch.testing.assert_close(ours[0], theirs, atol=2e-4, rtol=1e-4)


def test_ring_holds_only_the_window(loaded) -> None:
    """A ring never holds more than the window: the prefix that slid out is gone
    (overwritten in place), and generation is still exact."""
    model, ids, ref = loaded["gemma3"]
    arena = model.new_arena(len(ids) * 101)
    pool = model.new_window_pool(len(ids), granule_tokens=4)
    assert all(t.shape[0] == pool.capacity_slots == len(ids) * WINDOW for t in pool.k + pool.v)
    assert pool.bytes_per_token == model.num_sliding_layers * 2 * model.spec.num_kv_heads * model.spec.head_dim * 4
    locs = [slab(i * 101, 96) for i in range(len(ids))]
    assert greedy_generate_rings(model, arena, pool, ids, locs, None, MAX_NEW) == ref
    assert pool.stats().held_slots == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [None, 3])
def test_growing_rings_match_transformers(loaded, family: str, chunk: int | None) -> None:
    """Rings start at the prompt (granule 2), grow in place to the window, then wrap;
    unwritten slots hold garbage that must stay masked."""
    model, ids, ref = loaded[family]
    arena, _, locs, _ = _setup(model, len(ids))
    pool = model.new_window_pool(len(ids) + 2, granule_tokens=2)
    for t in pool.k + pool.v:
        t.fill_(30.0)
    ours = greedy_generate_rings(model, arena, pool, ids, locs, None, MAX_NEW, start_steps=[0, 3, 0, 7],
                                 prefill_chunk_tokens=chunk)
    assert ours == ref
    assert pool.in_place_grows > 0 and pool.second_runs == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_rings_of_two_runs_match_transformers(loaded, family: str) -> None:
    """Rings packed tightly (no room left for growth): a blocked ring continues in a second
    run and wraps over both."""
    model, ids, ref = loaded[family]
    arena, _, locs, _ = _setup(model, len(ids))
    pool = model.new_window_pool(len(ids) + 1, granule_tokens=2)
    for t in pool.k + pool.v:
        t.fill_(30.0)
    short = [[5, 9], [7], ids[2], [11, 4, 3]]  # three rings that must grow, one at the window
    short_ref = _reference_ids(loaded, family, short)
    assert greedy_generate_rings(model, arena, pool, short, locs, None, MAX_NEW, room_tokens=1) == short_ref
    assert pool.second_runs >= 2, f"{pool.second_runs} second runs: the test meant to block growth"
    assert greedy_generate_rings(model, arena, pool, ids, locs, None, MAX_NEW, room_tokens=1,
                                 start_steps=[0, 1, 2, 3]) == ref


_FOLDERS: dict[str, Path] = {}


def _reference_ids(loaded, family: str, prompts: list[list[int]]) -> list[list[int]]:
    return _reference(_FOLDERS[family], prompts)


def test_gemma3_linear_rope_and_final_softcap(tmp_path: Path) -> None:
    """Gemma-3 4B/12B/27B scale the global rope linearly; softcapping is a config option."""
    folder = make_tiny_gemma3(tmp_path / "g3x", window=6, num_layers=4, pattern=2, global_rope_factor=8.0,
                              final_logit_softcapping=5.0, seed=3)
    model, _, tok = load_model(folder, dtype="float32")
    assert model.extras.global_rope_factor == 8.0 and model.extras.final_logit_softcapping == 5.0
    ids = [tok(p)["input_ids"] for p in PROMPTS[1:3]]
    arena, pool, locs, rings = _setup(model, len(ids))
    assert greedy_generate_rings(model, arena, pool, ids, locs, rings, 16) == _reference(folder, ids, 16)


def test_unsupported_layer_type_is_rejected(folders, tmp_path: Path) -> None:
    import json
    import shutil

    from odma_mlu.models.loader import ModelFolderError

    folder = Path(shutil.copytree(folders["qwen2_sliding"], tmp_path / "bad"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_types"] = ["chunked_attention"] * cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="layer types \\['chunked_attention'\\] are not supported"):
        load_model(folder)
