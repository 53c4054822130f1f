"""Shared by the KV-policy tests: a tiny model shape, arenas over it, predictions and
reserve requests."""

from __future__ import annotations

import torch

from odma_mlu.config import ModelSpec
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.policy import ReserveRequest
from odma_mlu.predictor.base import LengthPrediction

TINY = ModelSpec(name="tiny", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 intermediate_size=64, vocab_size=100, max_position_embeddings=4096, dtype="float32")


def arena(cap: int, real: bool = False) -> KVArena:
    return KVArena(TINY, cap, dtype=torch.float32, shape_only=not real)


def pred(values: list[float], max_new: int) -> LengthPrediction:
    return LengthPrediction.from_values(values, max_new)


def rr(rid: str, prompt: int, max_new: int, num_tokens: int | None = None, prediction: LengthPrediction | None = None,
       true: int | None = None) -> ReserveRequest:
    return ReserveRequest(rid, prompt, max_new, prompt if num_tokens is None else num_tokens, prediction, true)


class CopiesAlwaysPay:
    """An ODMA ``RunCost`` where every extra run costs more than any copy: blocked growth
    copies the request into one run, or moves the blocking run, wherever it may, and is
    compacted from ``compact_from_tokens`` on; memory is priced out of reach, so no room is
    held past ``chunk_tokens``."""

    def read_run_s(self, tokens: int) -> float:
        return 1.0

    def copy_s(self, tokens: int, num_pending: int = 0) -> float:
        return 0.0

    def decode_fixed_s(self) -> float:
        return float("inf")

    def view_min_tokens(self) -> int | None:
        return 1  # every one-run decode read in place: compaction wherever its other conditions hold
