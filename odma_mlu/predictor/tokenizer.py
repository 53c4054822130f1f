"""A BPE tokenizer trained on the training prompts (nothing downloaded), and batch encoding.

Why its own tokenizer: the predictor must train from scratch offline, and a vocabulary fit
to the prompts it sees keeps the embedding table (the bulk of the model's bytes) small.
Why head + tail truncation: the instruction that decides the answer's length sits at the
start of Alpaca prompts and often at the end of chat prompts ("...rewrite this in 3 lines").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from odma_mlu.predictor.data import clean_text

PAD, CLS, UNK = "[PAD]", "[CLS]", "[UNK]"
PAD_ID, CLS_ID = 0, 1


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000) -> Tokenizer:
    """Byte-level BPE (every byte sequence encodes; no UNK surprises on odd text)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, CLS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((clean_text(t) for t in texts), trainer=trainer)
    assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(CLS) == CLS_ID, "special token ids moved"
    return tok


@dataclass(frozen=True)
class EncodedBatch:
    """Token ids (batch x seq, [CLS] first, PAD-padded) and each prompt's full token count."""

    ids: np.ndarray
    num_tokens: np.ndarray


class PromptEncoder:
    """Turns prompt strings (or None: no text) into fixed-width id arrays."""

    def __init__(self, tokenizer: Tokenizer, max_len: int = 128, tail_tokens: int = 32) -> None:
        assert max_len > tail_tokens + 1, "max_len must leave room for [CLS] and the head"
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.tail_tokens = tail_tokens

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @classmethod
    def load(cls, path: Path, max_len: int, tail_tokens: int) -> "PromptEncoder":
        return cls(Tokenizer.from_file(str(path)), max_len, tail_tokens)

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))

    def encode(self, texts: Sequence[str | None]) -> EncodedBatch:
        """Texts of None encode to [CLS] alone (count 0); the model also gets a has-text flag."""
        present = [i for i, t in enumerate(texts) if t is not None]
        encs = self.tokenizer.encode_batch([clean_text(texts[i]) for i in present],  # type: ignore[arg-type]
                                           add_special_tokens=False) if present else []
        body = self.max_len - 1
        head = body - self.tail_tokens
        ids = np.zeros((len(texts), self.max_len), dtype=np.int64)
        ids[:, 0] = CLS_ID
        counts = np.zeros(len(texts), dtype=np.int64)
        for i, e in zip(present, encs):
            seq = e.ids
            counts[i] = len(seq)
            if len(seq) > body:
                seq = seq[:head] + seq[-self.tail_tokens:]
            ids[i, 1:1 + len(seq)] = seq
        width = max(1, int((ids != PAD_ID).sum(axis=1).max()))
        return EncodedBatch(ids[:, :width], counts)
