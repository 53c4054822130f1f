"""Write a small random-weight Bamba (Mamba2 + attention) folder, entirely offline.

Same files as a real checkpoint (config.json, safetensors, tokenizer), built with
transformers' ``BambaForCausalLM`` and ``save_pretrained``; the tokenizer is tiny_model's
offline byte-level BPE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_model import EOS_TOKEN, build_tokenizer


def make_tiny_bamba(folder: str | Path, *, num_layers: int = 4, attn_layers: tuple[int, ...] = (1, 3),
                    hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                    mamba_heads: int = 8, mamba_groups: int = 2, d_state: int = 16, chunk_tokens: int = 8,
                    vocab: int = 448, seed: int = 0, dtype: str = "float32") -> Path:
    """A random-weight BambaForCausalLM folder; ``chunk_tokens`` is small so prompts span
    several scan chunks."""
    from transformers import BambaConfig, BambaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = BambaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, attn_layer_indices=list(attn_layers),
        mamba_n_heads=mamba_heads, mamba_n_groups=mamba_groups, mamba_d_state=d_state, mamba_d_conv=4,
        mamba_expand=2, mamba_chunk_size=chunk_tokens, max_position_embeddings=2048, rms_norm_eps=1e-5,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BambaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith(("A_log", "dt_bias", ".D")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)  # keep HF's init, perturbed
            elif name.endswith("conv1d.bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # larger than HF's 0.02 so logits are well separated (greedy ties are rare)
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "conv1d" in name else 0.08))
    model = model.to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
