"""Small random-weight models with sliding-window layers, written offline with transformers.

``make_tiny_qwen2_sliding``: Qwen2ForCausalLM whose ``layer_types`` mix sliding and full
attention (use_sliding_window=true). ``make_tiny_gemma3``: Gemma3ForCausalLM (text only),
5 local : 1 global by default, with Gemma-3's extra norms and two rope thetas. Both save the
byte-level BPE tokenizer of tests/tiny_model.py, so prompts encode the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tiny_model import EOS_TOKEN, build_tokenizer, randomize_weights


def _save(model: Any, tokenizer: Any, folder: Path, dtype: str) -> Path:
    model = model.to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_qwen2_sliding(folder: str | Path, *, window: int = 8, layer_types: list[str] | None = None,
                            hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                            vocab: int = 448, seed: int = 0, dtype: str = "float32") -> Path:
    """Qwen2 with ``layer_types`` (default: sliding, full, sliding, full) and ``window``-token windows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    types = layer_types or ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=len(types),
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
        use_sliding_window=True, sliding_window=window, layer_types=types,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    randomize_weights(model, seed, 1.0)
    return _save(model, tokenizer, folder, dtype)


def make_tiny_gemma3(folder: str | Path, *, window: int = 8, num_layers: int = 6, pattern: int = 6,
                     hidden: int = 64, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                     intermediate: int = 128, vocab: int = 448, seed: int = 0, dtype: str = "float32",
                     global_rope_factor: float | None = None, final_logit_softcapping: float | None = None) -> Path:
    """Gemma3ForCausalLM (text): layer i slides unless (i + 1) % pattern == 0; tied embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if global_rope_factor is not None:
        full_rope = {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": global_rope_factor}
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=2048,
        sliding_window=window, sliding_window_pattern=pattern, query_pre_attn_scalar=head_dim,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": full_rope},
        final_logit_softcapping=final_logit_softcapping, rms_norm_eps=1e-6,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    randomize_weights(model, seed, 0.0)  # Gemma norms scale by (1 + w): center w at 0
    return _save(model, tokenizer, folder, dtype)


def slab(start_slot: int, capacity_tokens: int) -> Any:
    """A one-run KVLocation, whichever form odma_mlu.kvcache.arena.KVLocation has."""
    import dataclasses

    from odma_mlu.kvcache.arena import KVLocation

    if "runs" in {f.name for f in dataclasses.fields(KVLocation)}:
        return KVLocation(runs=((start_slot, capacity_tokens),))
    return KVLocation(capacity_tokens, start_slot=start_slot)


def windowed_policy(model: Any, capacity_slots: int, policy: str = "paged", *, block_tokens: int | None = None,
                    page_tokens: int = 16, max_new_tokens: int = 64, fill: float | None = None,
                    odma_chunk_tokens: int = 16, run_cost: Any = None) -> Any:
    """(arena, WindowedPolicy) for ``model``: an arena of ``capacity_slots`` slots of its full
    layers, ``policy`` over it (ODMA holding live KV + ``odma_chunk_tokens``), rings of
    ``block_tokens`` blocks in the same arena. ``fill``:
    garbage written into every lane first (unwritten ring entries must stay masked).
    ``run_cost``: ODMA's copy pricing (None: it never copies)."""
    from dataclasses import replace

    from odma_mlu.config import CacheConfig
    from odma_mlu.kvcache.factory import make_policy
    from odma_mlu.kvcache.windowed import WindowedPolicy

    arena = model.new_arena(capacity_slots)
    if fill is not None:
        for t in arena.k + arena.v:
            t.fill_(fill)
    pool = model.new_window_pool(arena) if block_tokens is None else model.new_window_pool(arena, block_tokens)
    cache = replace(CacheConfig(), page_size_tokens=page_tokens, watermark_fraction=0.0)
    cache = replace(cache, odma=replace(cache.odma, chunk_tokens=odma_chunk_tokens))
    return arena, WindowedPolicy(make_policy(policy, arena, cache, max_new_tokens, run_cost=run_cost), pool)


def greedy_generate_rings(model: Any, arena: Any, policy: Any, prompts: list[list[int]], max_new_tokens: int, *,
                          start_steps: list[int] | None = None, prefill_chunk_tokens: int | None = None,
                          on_step: Any = None) -> list[list[int]]:
    """tests/tiny_model.greedy_generate through a ``WindowedPolicy`` (``windowed_policy``):
    each prompt i is request ``s{i}``, reserved when it enters (its ring too), grown before
    every step (its ring too), released at the end; every step reads the request's location
    and plans the rings from the policy, as the engine does. ``on_step(policy)`` runs after
    every step (e.g. to record how many runs the rings have)."""
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.kvcache.policy import GrowStatus, ReserveRequest
    from odma_mlu.models.attention import ForwardBatch, SequenceInput
    from tiny_model import greedy_generate

    def forward(seqs: list[Any], rows: list[int]) -> Any:
        for i, seq in zip(rows, seqs):
            rid = f"s{i}"
            if not policy.rings.holds(rid):
                req = ReserveRequest(rid, len(prompts[i]), max_new_tokens, seq.num_total_tokens)
                assert policy.reserve(req) is not None, f"no room for {rid}"
            res = policy.ensure_capacity(rid, seq.num_total_tokens)
            assert res.status == GrowStatus.OK, f"{rid} cannot grow: {res}"
        # Locations only once every request has grown: a growth may move another's run.
        placed = [SequenceInput(seq.token_ids, seq.num_cached_tokens, policy.location(f"s{i}"))
                  for i, seq in zip(rows, seqs)]
        batch = ForwardBatch.build(placed, device=model.device)
        plan = policy.rings.plan(batch, [f"s{i}" for i in rows], model.device)
        policy.check_integrity()
        arena.take_issued_copies()  # the step's KV copies run before its forward, as in the engine
        logits = model.forward(batch, arena, plan)
        if on_step is not None:
            on_step(policy)
        return logits

    dummy = [KVLocation(((0, 1),))] * len(prompts)  # replaced by the policy's location each step
    generated = greedy_generate(model, arena, prompts, dummy, max_new_tokens, start_steps=start_steps,
                                prefill_chunk_tokens=prefill_chunk_tokens, forward=forward)
    for i in range(len(prompts)):
        policy.release(f"s{i}", max_new_tokens)
    policy.check_integrity()
    assert policy.num_live() == 0 and policy.reserved_tokens() == 0, "KV leaked"
    return generated
