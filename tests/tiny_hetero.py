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

from tiny_model import EOS_TOKEN, build_tokenizer


def _randomize(model: Any, seed: int, norm_center: float) -> None:
    """Weights larger than HF's init (well separated logits); norms and biases random too."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name:
                p.copy_(norm_center + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)


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
    _randomize(model, seed, 1.0)
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
    _randomize(model, seed, 0.0)  # Gemma norms scale by (1 + w): center w at 0
    return _save(model, tokenizer, folder, dtype)


def slab(start_slot: int, capacity_tokens: int) -> Any:
    """A one-run KVLocation, whichever form odma_mlu.kvcache.arena.KVLocation has."""
    import dataclasses

    from odma_mlu.kvcache.arena import KVLocation

    if "runs" in {f.name for f in dataclasses.fields(KVLocation)}:
        return KVLocation(runs=((start_slot, capacity_tokens),))
    return KVLocation(capacity_tokens, start_slot=start_slot)


def greedy_generate_rings(model: Any, arena: Any, pool: Any, prompts: list[list[int]], locations: list[Any],
                          ring_slots: list[int] | None, max_new_tokens: int, *, start_steps: list[int] | None = None,
                          prefill_chunk_tokens: int | None = None, room_tokens: int | None = None,
                          ) -> list[list[int]]:
    """tests/tiny_model.greedy_generate with a RingBatch for the sliding layers.

    ``ring_slots``: fixed whole-window rings (ring r = slots [r * window, (r + 1) * window));
    None: growing rings placed by ``pool`` (``room_tokens`` is the growth each placement
    leaves room for: small values pack rings tightly and force second runs)."""
    from odma_mlu.models.attention import ForwardBatch
    from odma_mlu.models.window_attention import RingBatch
    from tiny_model import greedy_generate

    def forward(seqs: list[Any], rows: list[int]) -> Any:
        if pool is None:
            rings = None
        elif ring_slots is not None:
            rings = RingBatch.build(pool, seqs, [ring_slots[i] for i in rows], model.device)
        else:
            for i, seq in zip(rows, seqs):
                rid = f"s{i}"
                if not pool.holds(rid):
                    assert pool.allocate(rid, seq.num_total_tokens, room_tokens), f"no ring for {rid}"
                assert pool.ensure(rid, seq.num_total_tokens), f"the ring of {rid} cannot grow"
            rings = pool.plan(seqs, [f"s{i}" for i in rows], model.device)
            pool.check_integrity()
        return model.forward(ForwardBatch.build(seqs, device=model.device), arena, rings)

    generated = greedy_generate(model, arena, prompts, locations, max_new_tokens, start_steps=start_steps,
                                prefill_chunk_tokens=prefill_chunk_tokens, forward=forward)
    if pool is not None and ring_slots is None:
        for i in range(len(prompts)):
            pool.free(f"s{i}")
        pool.check_integrity()
    return generated
