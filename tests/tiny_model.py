"""Write a small random-weight Qwen2 model folder, entirely offline.

The folder has the same files a real Hugging Face checkpoint has (config.json, safetensors
weights, optionally sharded with an index, tokenizer.json + tokenizer_config.json with a
chat template), so tests exercise the exact loader path a real model takes. Nothing is
downloaded: the tokenizer is a byte-level BPE trained on a fixed word list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# A few hundred distinct words: enough for prompts of varied length in tests.
_WORDS = (
    "the a an of to in and or but is are was were be been being have has had do does did "
    "i you he she it we they me him her us them my your his its our their this that these "
    "those what which who whom whose when where why how all any both each few more most "
    "other some such no nor not only own same so than too very can will just should now "
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy music market sense nation plan college interest death "
    "experience effect use class control care field development role effort rate heart drug "
    "show leader light voice wife police mind price report decision son view relationship "
    "town road arm difference value building action model season society tax director "
    "position player record paper space ground form event official matter center couple site "
    "project activity star table need court oil situation cost industry figure street image "
    "phone data picture practice piece land product doctor wall patient worker news test "
    "movie north love support technology step baby computer type attention film tree source "
    "organization hair window evidence population truth song approach hello cache memory "
    "slab bucket token model serve request length predict contiguous page block"
).split()

SPECIAL_TOKENS = ("<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)



def randomize_weights(model: Any, seed: int, norm_center: float) -> None:
    """HF init draws std 0.02 weights and zero biases; give biases and norms random values too,
    so a test really checks them (q/k/v biases, norm weights around ``norm_center``), and
    weights larger than 0.02, so logits are well separated (greedy ties are rare)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name:
                p.copy_(norm_center + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)

def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE (Qwen2's tokenizer family) trained offline on ``_WORDS``.

    Byte-level, because transformers 5 rebuilds a qwen2 folder's tokenizer as Qwen2Tokenizer
    (byte-level BPE from tokenizer.json's vocab and merges) whatever model tokenizer.json holds.
    Every byte is in the alphabet, so any text encodes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(_WORDS[i:i + 12]) for i in range(0, len(_WORDS), 12)] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=None, pad_token="<pad>", eos_token=EOS_TOKEN,
        bos_token=None, chat_template=CHAT_TEMPLATE,
    )


def make_tiny_qwen2(folder: str | Path, *, num_layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128, vocab: int = 448, seed: int = 0,
                    dtype: str = "float32", sharded: bool = False, tie_word_embeddings: bool = False,
                    rope_theta: float = 10000.0, max_position_embeddings: int = 2048) -> Path:
    """Write a random-weight Qwen2ForCausalLM folder at ``folder`` and return its path.

    ``vocab`` must cover the tokenizer (400 entries); the model's extra rows are
    simply never produced by the tokenizer. ``sharded`` saves with a small
    ``max_shard_size`` so the folder holds ``model.safetensors.index.json`` plus shards.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    assert vocab >= len(tokenizer), f"vocab {vocab} smaller than the tokenizer's {len(tokenizer)} entries"
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings, use_sliding_window=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    randomize_weights(model, seed, 1.0)
    model = model.to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB" if sharded else "10GB")
    tokenizer.save_pretrained(folder)
    return folder


def greedy_generate(model, arena, prompts: "list[list[int]]", locations: "list", max_new_tokens: int, *,
                    start_steps: "list[int] | None" = None, prefill_chunk_tokens: "int | None" = None,
                    on_step=None, forward=None) -> "list[list[int]]":
    """Drive greedy decoding of several prompts through ``model.forward`` (the engine's loop, minus policy).

    Each step builds one ``ForwardBatch`` of every active sequence: a sequence enters at
    ``start_steps[i]`` (so prefills and decodes mix in one batch), prefills in chunks of
    ``prefill_chunk_tokens`` (None = whole prompt), then decodes one token per step.
    ``on_step(step, locations)`` runs before each step and may move KV and replace
    ``locations[i]`` (migration). ``forward(seqs, rows)`` replaces the plain
    ``model.forward(ForwardBatch.build(seqs), arena)`` (rows: each sequence's prompt index),
    e.g. to pass sliding-window rings. Returns the generated ids per prompt (no eos stop).
    """
    from odma_mlu.models.attention import ForwardBatch, SequenceInput

    n = len(prompts)
    start_steps = start_steps or [0] * n
    tokens = [list(p) for p in prompts]  # prompt + generated so far
    cached = [0] * n  # tokens whose K/V is in the arena
    generated: list[list[int]] = [[] for _ in range(n)]
    step = 0
    while any(len(g) < max_new_tokens for g in generated):
        if on_step is not None:
            on_step(step, locations)
        batch_rows: list[int] = []
        seqs = []
        for i in range(n):
            if step < start_steps[i] or len(generated[i]) >= max_new_tokens:
                continue
            todo = tokens[i][cached[i]:]
            if prefill_chunk_tokens is not None and cached[i] < len(prompts[i]):
                todo = todo[:prefill_chunk_tokens]
            seqs.append(SequenceInput(tuple(todo), cached[i], locations[i]))
            batch_rows.append(i)
        step += 1
        if not seqs:
            continue
        if forward is None:
            logits = model.forward(ForwardBatch.build(seqs, device=model.device), arena)
        else:
            logits = forward(seqs, batch_rows)
        next_ids = logits.argmax(dim=-1).tolist()
        for row, (i, seq) in enumerate(zip(batch_rows, seqs)):
            cached[i] += seq.num_new_tokens
            if cached[i] == len(tokens[i]):  # a finished prefill chunk yields no token until the prompt is done
                tokens[i].append(next_ids[row])
                generated[i].append(next_ids[row])
    return generated
