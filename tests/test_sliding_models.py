"""Sliding-window models (Qwen2 with mixed layer_types, Gemma-3 text) against transformers.

Windows (8 tokens) are shorter than the prompts and than the generation, so every sliding
layer wraps its ring many times; full layers use the arena as Qwen2 does, and the rings
live in the same arena, reserved through the policy (kvcache/window.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from odma_mlu.models.loader import load_model
from hf_reference import hf_greedy, load_hf
from policy_helpers import CopiesAlwaysPay
from tiny_hetero import greedy_generate_rings, make_tiny_gemma3, make_tiny_qwen2_sliding, windowed_policy

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
UNEVEN = ["qwen2_3over2", "gemma3_5over2"]
"""Shapes whose F full layers do not divide the S sliding ones: Qwen2 with 3 sliding over 2
full layers, Gemma-3 with 5 over 2 (7 layers, every third global): a layer's blocks lie in
both lanes and rings end in part-used row-blocks."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "qwen2_sliding": make_tiny_qwen2_sliding(tmp_path_factory.mktemp("q2s"), window=WINDOW),
        "gemma3": make_tiny_gemma3(tmp_path_factory.mktemp("g3"), window=WINDOW),
        "qwen2_3over2": make_tiny_qwen2_sliding(tmp_path_factory.mktemp("q2u"), window=WINDOW, seed=4, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]),
        "gemma3_5over2": make_tiny_gemma3(tmp_path_factory.mktemp("g3u"), window=WINDOW, num_layers=7, pattern=3,
                                          seed=5),
    }


def _reference(folder: Path, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    return hf_greedy(folder, prompts, max_new)


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


def _setup(model: Any, policy: str = "paged", capacity: int = 1024, **kw: Any) -> tuple[Any, Any]:
    """(arena, WindowedPolicy): requests and their rings in one arena of the full layers,
    filled with garbage first (ring entries not yet written must be masked, whatever they hold)."""
    return windowed_policy(model, capacity, policy, max_new_tokens=MAX_NEW, fill=30.0, **kw)


@pytest.mark.parametrize("family", FAMILIES + UNEVEN)
def test_layer_groups_from_config(loaded, family: str) -> None:
    model = loaded[family][0]
    assert model.window_tokens == WINDOW
    assert model.num_sliding_layers > 0 and model.num_full_layers > 0
    if family == "gemma3":  # 5 local : 1 global
        assert model.layer_windows == (WINDOW,) * 5 + (None,)
    if family in UNEVEN:
        assert model.num_sliding_layers % model.num_full_layers != 0
        assert (model.num_sliding_layers, model.num_full_layers) == {"qwen2_3over2": (3, 2),
                                                                     "gemma3_5over2": (5, 2)}[family]


@pytest.mark.parametrize("family", FAMILIES + UNEVEN)
@pytest.mark.parametrize("policy", ["paged", "odma", "static"])
def test_batched_greedy_matches_transformers(loaded, family: str, policy: str) -> None:
    model, ids, ref = loaded[family]
    arena, windowed = _setup(model, policy)
    ours = greedy_generate_rings(model, arena, windowed, ids, MAX_NEW, start_steps=[0, 3, 0, 7])
    assert ours == ref


@pytest.mark.parametrize("family", FAMILIES + UNEVEN)
def test_chunked_prefill_matches_transformers(loaded, family: str) -> None:
    """Chunks of 5 read the cached part of the window back from the ring."""
    model, ids, ref = loaded[family]
    arena, windowed = _setup(model)
    assert greedy_generate_rings(model, arena, windowed, ids, MAX_NEW, prefill_chunk_tokens=5) == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(loaded, folders, family: str) -> None:
    from odma_mlu.kvcache.policy import ReserveRequest
    from odma_mlu.models.attention import ForwardBatch, SequenceInput

    model, ids, _ = loaded[family]
    hf = load_hf(folders[family])
    arena, windowed = _setup(model)
    prompt = ids[3]
    assert windowed.reserve(ReserveRequest("p", len(prompt), MAX_NEW, len(prompt))) is not None
    seq = SequenceInput(tuple(prompt), 0, windowed.location("p"))
    fb = ForwardBatch.build([seq])
    ours = model.forward(fb, arena, windowed.rings.plan(fb, ["p"]))
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0, -1].float()
    torch.testing.assert_close(ours[0], theirs, atol=2e-4, rtol=1e-4)


def test_rings_live_in_the_arena_lanes(loaded) -> None:
    """Gemma-3 (5 sliding : 1 full): every layer's blocks in the one lane (the flat tensor is
    that lane); a ring never holds more than the window (the prefix that slid out is overwritten in place), it is a second
    request of the policy, and generation is still exact."""
    model, ids, ref = loaded["gemma3"]
    arena, windowed = _setup(model, block_tokens=4)
    pool = windowed.rings
    assert pool.num_lanes == 1 and pool.num_layers == 5 and pool.k is arena.k_groups and pool.v is arena.v_groups
    assert len(arena.k_groups) == 1
    assert arena.k[0].data_ptr() == arena.k_groups[0].data_ptr() and arena.k[0].shape == arena.k_groups[0].shape
    assert pool.rows_for(3) == 5 * 4 and pool.rows_for(100) == pool.rows_for(WINDOW) == 5 * WINDOW
    held: list[tuple[int, int]] = []

    def record(policy: Any) -> None:
        stats = policy.rings.stats()
        held.append((stats.held_slots, policy.reserved_tokens()))
        assert policy.inner.num_live() == 2 * policy.num_live()

    assert greedy_generate_rings(model, arena, windowed, ids, MAX_NEW, on_step=record) == ref
    most_rows = len(ids) * -(-5 * WINDOW // 16) * 16  # paged: whole pages
    assert max(h for h, _ in held) <= most_rows and all(h < r for h, r in held)
    assert pool.stats().held_slots == 0 and pool.stats().num_rings == 0


@pytest.mark.parametrize("family", FAMILIES + UNEVEN)
@pytest.mark.parametrize("chunk", [None, 3])
def test_growing_rings_match_transformers(loaded, family: str, chunk: int | None) -> None:
    """Rings start at the prompt (block 2), grow with the request (in place under ODMA) to
    the window, then wrap; unwritten slots hold garbage that must stay masked."""
    model, ids, ref = loaded[family]
    arena, windowed = _setup(model, "odma", block_tokens=2, page_tokens=2, odma_chunk_tokens=1)
    ours = greedy_generate_rings(model, arena, windowed, ids, MAX_NEW, start_steps=[0, 3, 0, 7],
                                 prefill_chunk_tokens=chunk)
    assert ours == ref
    assert windowed.rings.in_place_grows > 0


@pytest.mark.parametrize("family", FAMILIES + UNEVEN)
def test_rings_of_many_runs_match_transformers(loaded, family: str) -> None:
    """Small pages and interleaved requests: rings span several runs of the arena, not in
    ring order, and wrap over all of them."""
    model, ids, ref = loaded[family]
    arena, windowed = _setup(model, "paged", capacity=512, block_tokens=2, page_tokens=2)
    most_runs: list[int] = []

    def record(p: Any) -> None:
        rings = p.rings
        most_runs.append(max(len(rings.runs_of(rid, j)) for rid in rings.ring_ids() for j in range(rings.num_layers)))

    short = [[5, 9], [7], ids[2], [11, 4, 3]]
    assert greedy_generate_rings(model, arena, windowed, short, MAX_NEW, on_step=record) == \
        _reference_ids(loaded, family, short)
    assert greedy_generate_rings(model, arena, windowed, ids, MAX_NEW, start_steps=[0, 1, 2, 3],
                                 on_step=record) == ref
    assert max(most_runs) >= 3, f"rings of at most {max(most_runs)} runs: the test meant to scatter them"


@pytest.mark.parametrize("family", FAMILIES + UNEVEN)
def test_requests_moved_by_odma_copies_match_transformers(loaded, family: str) -> None:
    """ODMA packed tight (holds live + 1, no room between requests) moves a blocked request
    into one run: the copy takes every lane of the request's slots, beside ring entries of
    other requests in the same lanes, which must stay. Some growths move a blocking neighbour's
    run instead (``OdmaPolicy._move_blocker``; qwen2_sliding and gemma3_5over2 here). A ring is
    never moved (it is read per block, whatever its runs: ``ReserveRequest.read_per_block``)."""
    model, ids, ref = loaded[family]
    capacity = {"qwen2_sliding": 256, "gemma3": 400, "qwen2_3over2": 300, "gemma3_5over2": 300}[family]
    arena, windowed = _setup(model, "odma", capacity=capacity, block_tokens=2, page_tokens=2, odma_chunk_tokens=1,
                             run_cost=CopiesAlwaysPay())
    assert greedy_generate_rings(model, arena, windowed, ids, MAX_NEW, start_steps=[0, 1, 2, 3]) == ref
    assert windowed.inner.copies > 0, "the test meant ODMA to move a request"
    assert windowed.rings.copies == 0, "a ring was copied into one run"


_FOLDERS: dict[str, Path] = {}


def _reference_ids(loaded, family: str, prompts: list[list[int]]) -> list[list[int]]:
    return _reference(_FOLDERS[family], prompts)


def test_gemma3_linear_rope_and_final_softcap(tmp_path: Path) -> None:
    """Gemma-3 4B/12B/27B scale the global rope linearly; softcapping is a config option.
    Two full layers of four: two lanes, two sliding layers (one cell of each lane a block)."""
    folder = make_tiny_gemma3(tmp_path / "g3x", window=6, num_layers=4, pattern=2, global_rope_factor=8.0,
                              final_logit_softcapping=5.0, seed=3)
    model, _, tok = load_model(folder, dtype="float32")
    assert model.extras.global_rope_factor == 8.0 and model.extras.final_logit_softcapping == 5.0
    ids = [tok(p)["input_ids"] for p in PROMPTS[1:3]]
    arena, windowed = _setup(model, "odma")
    assert windowed.rings.num_lanes == 2 and windowed.rings.num_layers == 2
    assert greedy_generate_rings(model, arena, windowed, ids, 16) == _reference(folder, ids, 16)


def test_sliding_layers_need_full_layers(folders, tmp_path: Path) -> None:
    """Rings live in the full layers' arena: a model whose every layer slides is refused."""
    import json
    import shutil

    from odma_mlu.errors import ConfigError

    folder = Path(shutil.copytree(folders["qwen2_sliding"], tmp_path / "all_sliding"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="every one of the 4 attention layers slides"):
        load_model(folder)


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
