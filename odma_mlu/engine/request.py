"""Request and sequence state shared by the real engine and the emulator's replay."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from odma_mlu.predictor.base import LengthPrediction, RequestFeatures


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request's mutable state.

    ``num_tokens`` = prompt + generated. ``kv_tokens`` = tokens whose KV is in the arena;
    the newest sampled token has no KV until the next decode step writes it, so while
    running ``kv_tokens == num_tokens - 1``.
    """

    request_id: str
    prompt_tokens: int
    max_new_tokens: int
    arrival_s: float = 0.0
    prompt_token_ids: list[int] | None = None
    features: RequestFeatures | None = None
    prediction: LengthPrediction | None = None
    true_output_tokens: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_generated: int = 0
    kv_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: str | None = None
    first_capacity_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_generated

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def all_token_ids(self) -> list[int]:
        assert self.prompt_token_ids is not None, "shape-only sequences carry no token ids"
        return self.prompt_token_ids + self.output_token_ids
