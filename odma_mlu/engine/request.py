"""Request and sequence state shared by the real engine and the emulator's replay."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.predictor.base import LengthPrediction, RequestFeatures


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request's mutable state.

    ``num_tokens`` = prompt + generated. ``kv_tokens`` = tokens whose KV is computed (in
    the arena, or in a shared prefix); the newest sampled token has no KV until the next
    decode step writes it, so a decoding sequence has ``kv_tokens == num_tokens - 1``; one
    whose prompt is being prefilled in chunks has fewer.

    ``token_ids`` (prompt + generated) grows by one list append per token (``append_token``),
    so the engine never rebuilds a sequence's token list in a step; ``last_token_id`` is the
    newest token, the decode input.
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
    swapped_tokens: int = 0
    """Preempted with its KV copied to host memory: the tokens held there (0: none; a
    preemption without swap space recomputes)."""
    swapped_slots: tuple[int, ...] = ()
    """The arena slots each swap gather of it moved (``KVPolicy.swap_slots``): its runs, and
    a ring's rows; what the host link carries and the swap space holds."""
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: str | None = None
    first_capacity_tokens: int | None = None
    kv_location: KVLocation | None = field(default=None, repr=False, compare=False)
    """The policy's runs for this sequence, cached by the scheduler (None: ask the policy)."""
    token_ids: list[int] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prompt_token_ids is not None and not self.token_ids:
            self.token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_generated

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def append_token(self, token_id: int) -> None:
        """Record one generated token (O(1): appends to the two token lists)."""
        self.output_token_ids.append(token_id)
        if self.prompt_token_ids is not None:
            self.token_ids.append(token_id)
        self.num_generated += 1
