"""Continuous-batching scheduler, shared as-is by the real engine and the emulator replay.

Each ``schedule()`` is two plain loops::

    1. running (oldest first): make room for the token this step writes
         policy.ensure_capacity -> OK | NO_ROOM: preempt the newest running request, retry
                                       | REQUEUE: preempt this one (S3 re-buckets it)
    2. waiting (FCFS; preempted requests return to the front): admit while the policy
       can reserve and the limits on sequences and batched tokens allow; never admit in a
       step that had to preempt (the memory is evidently tight) unless nothing is left running

Grouping decode sequences into attention calls is not the scheduler's business:
``odma_mlu.engine.step_work.decode_group_key`` decides it in one place. Preemption is by recompute: the KV is dropped and the prompt plus the
tokens generated so far are prefilled again later, so output tokens never change.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

from odma_mlu.config import SchedulerConfig
from odma_mlu.errors import RequestRejected
from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.kvcache.policy import GrowStatus, KVPolicy, ReserveRequest
from odma_mlu.engine.request import Sequence, SeqStatus
from odma_mlu.predictor.base import LengthPredictor

PREDICT_BATCH = 64


@dataclass(frozen=True)
class ScheduledBatch:
    prefill: tuple[Sequence, ...]
    decode: tuple[Sequence, ...]
    preempted: tuple[Sequence, ...]

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode

    def all_seqs(self) -> tuple[Sequence, ...]:
        return self.prefill + self.decode


class Scheduler:
    def __init__(self, policy: KVPolicy, config: SchedulerConfig, max_context_tokens: int | None = None,
                 predictor: LengthPredictor | None = None) -> None:
        self.policy = policy
        self.predictor = predictor if policy.uses_prediction else None
        self.config = config
        self.max_context_tokens = max_context_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Submission order breaks ties between equal arrival times (offline replay: all 0), so
        # "oldest" is FCFS order; the request id string ("r10" < "r9") is not an age.
        self._submitted: dict[str, int] = {}
        self._num_submitted = 0

    # -- admission checks ----------------------------------------------------------------
    def validate(self, seq: Sequence) -> None:
        """Reject requests that can never run, before they touch any memory."""
        if seq.prompt_tokens <= 0:
            raise RequestRejected(f"request {seq.request_id}: empty prompt; send at least one token")
        if seq.max_new_tokens <= 0:
            raise RequestRejected(f"request {seq.request_id}: max_new_tokens={seq.max_new_tokens}; it must be >= 1")
        total = seq.prompt_tokens + seq.max_new_tokens
        if self.max_context_tokens is not None and total > self.max_context_tokens:
            raise RequestRejected(
                f"request {seq.request_id}: prompt {seq.prompt_tokens} + max_new_tokens {seq.max_new_tokens} = "
                f"{total} tokens exceeds the model context of {self.max_context_tokens}; shorten the prompt or "
                "lower max_new_tokens")
        limit = self.policy.max_request_tokens()
        if total > limit:
            raise RequestRejected(
                f"request {seq.request_id}: needs up to {total} KV tokens but policy {self.policy.name!r} can give "
                f"one request at most {limit} (KV capacity {self.policy.capacity_tokens}); lower max_new_tokens "
                "or give the KV cache more memory")

    def add(self, seq: Sequence) -> None:
        self.validate(seq)
        seq.status = SeqStatus.WAITING
        self._submitted[seq.request_id] = self._num_submitted
        self._num_submitted += 1
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _reserve_request(self, seq: Sequence) -> ReserveRequest:
        return ReserveRequest(seq.request_id, seq.prompt_tokens, seq.max_new_tokens, seq.num_tokens,
                              seq.prediction, seq.true_output_tokens)

    # -- preemption ------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.policy.release(seq.request_id, None)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.kv_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- the two loops ---------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        preempted: list[Sequence] = []
        decode: list[Sequence] = []
        # Loop 1: running sequences, oldest first; victims are taken from the newest end.
        queue = sorted(self.running, key=lambda s: (s.arrival_s, self._submitted.get(s.request_id, 0)))
        while queue:
            seq = queue.pop(0)
            while True:
                res = self.policy.ensure_capacity(seq.request_id, seq.num_tokens)
                if res.status == GrowStatus.OK:
                    decode.append(seq)
                    break
                if res.status == GrowStatus.REQUEUE or not queue:
                    self._preempt(seq)
                    preempted.append(seq)
                    break
                victim = queue.pop()  # newest not-yet-scheduled request
                self._preempt(victim)
                preempted.append(victim)
        # Loop 2: admit waiting requests FCFS.
        prefill: list[Sequence] = []
        # After a preemption memory is tight, except when nothing runs any more (e.g. every
        # S3 request hit its bucket edge in the same step): then admit, or the step is empty.
        if not preempted or not self.running:
            budget = self.config.max_num_batched_tokens - len(decode)
            self._predict_head()
            while self.waiting and len(self.running) < self.config.max_num_seqs:
                seq = self.waiting[0]
                # One over-budget prompt may run alone (there is no chunked prefill).
                if seq.num_tokens > budget and prefill:
                    break
                loc = self.policy.reserve(self._reserve_request(seq))
                if loc is None:
                    break
                self.waiting.popleft()
                if seq.first_capacity_tokens is None:
                    seq.first_capacity_tokens = loc.capacity_tokens
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                prefill.append(seq)
                budget -= seq.num_tokens
        return ScheduledBatch(tuple(prefill), tuple(decode), tuple(preempted))

    def _predict_head(self) -> None:
        """Predict lengths for the head of the queue, in one batch, just before admission,
        so predictors that learn online use everything finished so far."""
        if self.predictor is None or not self.waiting or self.waiting[0].prediction is not None:
            return
        todo = [s for s in list(self.waiting)[:PREDICT_BATCH] if s.prediction is None and s.features is not None]
        for s, p in zip(todo, self.predictor.predict_batch([s.features for s in todo])):
            s.prediction = p

    def location(self, seq: Sequence) -> KVLocation:
        return self.policy.location(seq.request_id)

    # -- after the step ----------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, finished: Iterable[Sequence]) -> None:
        """Account the step: every scheduled sequence wrote KV for all but its newest token."""
        for seq in batch.all_seqs():
            seq.kv_tokens = seq.num_tokens - 1 if seq.num_generated > 0 else seq.num_tokens
        for seq in finished:
            seq.status = SeqStatus.FINISHED
            self.running.remove(seq)
            self._submitted.pop(seq.request_id, None)
            self.policy.release(seq.request_id, seq.num_generated)
            if self.predictor is not None and seq.features is not None:
                self.predictor.observe(seq.features, seq.num_generated)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is; its KV (if any) is freed."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._submitted.pop(request_id, None)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = "abort"
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._submitted.pop(request_id, None)
                self.policy.release(seq.request_id, None)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = "abort"
                return seq
        return None

    def live_kv_tokens(self) -> int:
        return sum(s.kv_tokens for s in self.running)
