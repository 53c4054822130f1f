"""transformers' greedy continuation, the reference every equality test compares against:
one prompt at a time (no padding effects), exactly ``max_new_tokens`` tokens (no EOS stop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ENGINE_PROMPTS = [
    "the cache model serve request",
    "hello world of memory and bucket and token and page block with the people of the city",
    "a",
    "what is the length of a contiguous slab in the school house of the family",
    "time year people way day man thing woman life child world school state family student group",
    "power hour game line end",
]
"""Six prompts of 1 to ~20 tokens for the engine equality tests (mixed lengths, so a batch
holds prefills and decodes of several span classes at once)."""


def load_hf(folder: Path) -> Any:
    """The transformers model of a tiny test folder, float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def encode(folder: Path, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` by the folder's tokenizer, without special tokens (as the engine)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def hf_greedy(model_or_folder: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), ``max_new_tokens`` each; takes a loaded
    model or a folder."""
    hf = load_hf(model_or_folder) if isinstance(model_or_folder, Path) else model_or_folder
    out = []
    for ids in prompts:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(ids):].tolist())
    return out
