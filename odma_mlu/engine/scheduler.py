"""Continuous-batching scheduler, shared as-is by the real engine and the emulator replay.

Each ``schedule()`` spends one token budget (``max_num_batched_tokens``) in two loops::

    1. running (decodes first, then unfinished prefills; oldest first in each): make room for
       the tokens this step writes
         policy.ensure_capacity -> OK | NO_ROOM: preempt the newest running request, retry
                                       | REQUEUE: preempt this one (S3 re-buckets it)
    2. waiting (FCFS; preempted requests return to the front): admit while the policy
       can reserve and the limits on sequences and batched tokens allow; never admit in a
       step that had to preempt (the memory is evidently tight) unless nothing is left running

Chunked prefill (``SchedulerConfig.enable_chunked_prefill``, as vLLM v1): a sequence
tracks the tokens whose KV is computed (``Sequence.kv_tokens``); every step it computes
``min(left, max_prefill_chunk_tokens, budget left)`` of the rest, so a long prompt is spread
over several steps next to the running decodes instead of stalling them. Decodes are
scheduled before prefill chunks, so a prompt never takes the budget of a running decode.
Admission reserves the whole prompt (vLLM's "admit on the full input length"), so a
prompt's later chunks never run out of room. Only a sequence whose chunk reaches its last
token samples (``ScheduledBatch.sampled``). Without chunking a prompt is prefilled whole
and one over-budget prompt may run alone.

A prefix-caching policy (odma_mlu/kvcache/prefix.py) may report at admission that the
first tokens of a prompt are already in KV (``cached_prefix_tokens``): prefill starts there.

Grouping decode sequences into attention calls is not the scheduler's business:
``odma_mlu.engine.step_work.decode_group_key`` decides it in one place.

Preemption swaps where it can and recomputes otherwise, for every policy alike::

    preempt(seq):  computed KV fits the host swap space left?
        yes -> swap: ``on_swap_out(seq, runs)`` copies it to host memory *before* the policy
               frees the runs (a later growth in the same ``schedule()`` may write there);
               re-admission reserves room as usual, the batch lists the sequence in
               ``swapped_in`` and the engine writes the KV back before the forward; only
               the newest token is left to compute
        no  -> recompute: the KV is dropped; prompt + tokens generated so far are
               prefilled again later (in chunks, with chunking on)

Either way output tokens never change. ``ScheduledBatch.swap_tokens`` lists the arena slots
each swap gather moved over the host link (a request's runs, and a sliding-window model's
ring rows: ``KVPolicy.swap_slots``), so the step-cost function charges them.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from odma_mlu.config import SchedulerConfig
from odma_mlu.errors import RequestRejected
from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.kvcache.policy import GrowStatus, KVPolicy, ReserveRequest
from odma_mlu.engine.request import Sequence, SeqStatus
from odma_mlu.predictor.base import LengthPredictor

PREDICT_BATCH = 64
log = logging.getLogger("odma_mlu.scheduler")


@dataclass(frozen=True)
class ScheduledBatch:
    prefill: tuple[Sequence, ...]
    """Sequences computing more than their newest token: prompts, prompt chunks, recomputes."""
    decode: tuple[Sequence, ...]
    preempted: tuple[Sequence, ...]
    prefill_chunk_tokens: tuple[int, ...] = ()
    """New tokens each prefill computes this step (aligned with ``prefill``)."""
    prefill_cached_tokens: tuple[int, ...] = ()
    """Tokens each prefill already had in KV before this step (prefix hits, earlier chunks,
    KV swapped back in)."""
    swapped_in: tuple[Sequence, ...] = ()
    """Re-admitted sequences whose KV comes back from host memory: the engine writes it to
    their new runs before the forward (they are among ``prefill``)."""
    swap_tokens: tuple[int, ...] = ()
    """Arena slots each swap gather of this step moved over the host link (swap-outs, then
    swap-ins; a sliding-window model's swap is two: its runs and its ring rows)."""

    def __post_init__(self) -> None:
        if not self.prefill_chunk_tokens and self.prefill:  # built by hand: whole prefills
            object.__setattr__(self, "prefill_chunk_tokens", tuple(s.num_tokens for s in self.prefill))
            object.__setattr__(self, "prefill_cached_tokens", (0,) * len(self.prefill))
        assert len(self.prefill_chunk_tokens) == len(self.prefill) == len(self.prefill_cached_tokens), \
            "one chunk size and one cached count per prefill"

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode

    def all_seqs(self) -> tuple[Sequence, ...]:
        return self.prefill + self.decode

    def completes(self, index: int) -> bool:
        """Prefill ``index`` reaches its last token this step (it samples)."""
        s = self.prefill[index]
        return self.prefill_cached_tokens[index] + self.prefill_chunk_tokens[index] == s.num_tokens

    @property
    def sampled(self) -> tuple[Sequence, ...]:
        """Sequences that produce a token this step: every decode and each completing prefill."""
        if all(self.completes(i) for i in range(len(self.prefill))):
            return self.all_seqs()
        return tuple(s for i, s in enumerate(self.prefill) if self.completes(i)) + self.decode

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.prefill_chunk_tokens) + len(self.decode)


class Scheduler:
    def __init__(self, policy: KVPolicy, config: SchedulerConfig, max_context_tokens: int | None = None,
                 predictor: LengthPredictor | None = None, swap_capacity_tokens: int = 0,
                 on_swap_out: Callable[[Sequence, KVLocation], None] | None = None) -> None:
        """``swap_capacity_tokens``: KV tokens the host swap space holds (0: recompute only;
        a policy that is not ``swappable`` always recomputes).
        ``on_swap_out(seq, runs)``: copies the KV of ``seq``'s first ``seq.kv_tokens`` tokens
        out of ``runs`` to the host (the engine's; the replay only counts)."""
        self.policy = policy
        self.predictor = predictor if policy.uses_prediction else None
        self.config = config
        self.max_context_tokens = max_context_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.swap_capacity_tokens = swap_capacity_tokens if policy.swappable else 0
        self.swap_used_tokens = 0
        self.num_swaps = 0
        self.swapped_tokens_total = 0
        """KV tokens moved over the host link, out and in (every swap)."""
        self.on_swap_out = on_swap_out
        # Submission order breaks ties between equal arrival times (offline replay: all 0), so
        # "oldest" is FCFS order; the request id string ("r10" < "r9") is not an age.
        self._submitted: dict[str, int] = {}
        self._num_submitted = 0
        self._offer_prompt = getattr(policy, "set_prompt_tokens", None)
        """A prefix-caching policy reads the prompt's token ids before ``reserve``."""
        self._running_dirty = False
        """``running`` needs re-sorting (a sequence joined, or one moved from prefill to decode)."""

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
    def _preempt(self, seq: Sequence, swaps: list[int]) -> None:
        n = seq.kv_tokens
        slots = self.policy.swap_slots(seq.request_id, n) if n > 0 and self.swap_capacity_tokens else ()
        if slots and sum(slots) <= self.swap_capacity_tokens - self.swap_used_tokens and self._copy_out(seq):
            seq.swapped_tokens, seq.swapped_slots = n, slots
            self.swap_used_tokens += sum(slots)
            self.num_swaps += 1
            self._note_swap(slots, swaps)
        self.policy.release(seq.request_id, None)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.kv_tokens = 0
        seq.kv_location = None
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _copy_out(self, seq: Sequence) -> bool:
        """Copy ``seq``'s KV to the host before its runs are freed; a failed copy (host memory
        exhausted, say) is logged and the preemption recomputes instead."""
        if self.on_swap_out is None:
            return True
        try:
            self.on_swap_out(seq, self.location(seq))
        except Exception:  # noqa: BLE001 - recompute is always possible
            log.warning("swap-out of %s failed; it will be recomputed", seq.request_id, exc_info=True)
            return False
        return True

    def _note_swap(self, slots: tuple[int, ...], swaps: list[int]) -> None:
        swaps.extend(slots)
        self.swapped_tokens_total += sum(slots)

    def _release_swap(self, seq: Sequence) -> None:
        """Forget ``seq``'s host copy in the accounting (it came back, or the request ended)."""
        self.swap_used_tokens -= sum(seq.swapped_slots)
        seq.swapped_tokens, seq.swapped_slots = 0, ()

    # -- the two loops ---------------------------------------------------------------------
    def _chunk(self, left_tokens: int, budget_tokens: int) -> int:
        """Tokens a prefill with ``left_tokens`` to compute may take now (0: not this step)."""
        cfg = self.config
        if not cfg.enable_chunked_prefill:
            return left_tokens
        return max(0, min(left_tokens, cfg.max_prefill_chunk_tokens, budget_tokens))

    def _order_key(self, s: Sequence) -> tuple[bool, float, int]:
        return (s.num_tokens - s.kv_tokens > 1, s.arrival_s, self._submitted.get(s.request_id, 0))

    def schedule(self) -> ScheduledBatch:
        chunked = self.config.enable_chunked_prefill
        budget = self.config.max_num_batched_tokens
        preempted: list[Sequence] = []
        swapped_in: list[Sequence] = []
        swaps: list[int] = []
        decode: list[Sequence] = []
        prefill: list[Sequence] = []
        chunks: list[int] = []
        cached: list[int] = []
        # Loop 1: running sequences, decodes before unfinished prefills, oldest first in each;
        # victims are taken from the newest end (unfinished prefills first).
        if self._running_dirty:
            self.running.sort(key=self._order_key)
            self._running_dirty = False
        queue = deque(self.running)
        while queue:
            seq = queue.popleft()
            left = seq.num_tokens - seq.kv_tokens
            n = 1 if left == 1 else self._chunk(left, budget)
            if chunked and (n <= 0 or n > budget):
                continue  # no budget left this step: it waits in place, KV kept
            while True:
                res = self.policy.ensure_capacity(seq.request_id, seq.kv_tokens + n)
                if res.how:  # the runs changed (even where a second part then failed): refresh the cached location
                    seq.kv_location = None
                moved = self.policy.take_moved()
                if moved:  # ODMA moved another request's run out of this one's way
                    self._forget_locations(moved)
                if res.status == GrowStatus.OK:
                    if left == 1:
                        decode.append(seq)
                    else:
                        prefill.append(seq)
                        chunks.append(n)
                        cached.append(seq.kv_tokens)
                    budget -= n
                    break
                if res.status == GrowStatus.REQUEUE or not queue:
                    self._preempt(seq, swaps)
                    preempted.append(seq)
                    break
                victim = queue.pop()  # newest not-yet-scheduled request
                self._preempt(victim, swaps)
                preempted.append(victim)
        if not chunked:  # the historical rule: decodes take one token each of the budget
            budget = self.config.max_num_batched_tokens - len(decode) - sum(chunks)
        # Loop 2: admit waiting requests FCFS.
        # After a preemption memory is tight, except when nothing runs any more (e.g. every
        # S3 request hit its bucket edge in the same step): then admit, or the step is empty.
        if not preempted or not self.running:
            while self.waiting and len(self.running) < self.config.max_num_seqs and (budget > 0 or not chunked):
                self._predict_head()  # every admitted request has its prediction, however many a step admits
                seq = self.waiting[0]
                # Without chunking one over-budget prompt may join the decodes as the step's
                # only prefill (a recompute of a long reasoning output exceeds any budget;
                # waiting for every decode to finish would idle the card).
                if not chunked and seq.num_tokens > budget and prefill:
                    break
                if self._offer_prompt is not None:
                    self._offer_prompt(seq.request_id, seq.prompt_token_ids)
                loc = self.policy.reserve(self._reserve_request(seq))
                if loc is None:
                    break
                self.waiting.popleft()
                if seq.first_capacity_tokens is None:
                    seq.first_capacity_tokens = loc.capacity_tokens
                seq.kv_location = None
                if seq.swapped_tokens:  # its KV comes back from the host: only the rest is computed
                    seq.kv_tokens = seq.swapped_tokens
                    self._note_swap(seq.swapped_slots, swaps)
                    self._release_swap(seq)
                    swapped_in.append(seq)
                else:
                    seq.kv_tokens = self._cached_prefix(seq)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                self._running_dirty = True
                n = self._chunk(seq.num_tokens - seq.kv_tokens, budget)
                assert n > 0, f"{seq.request_id}: admitted with no tokens to compute"
                prefill.append(seq)
                chunks.append(n)
                cached.append(seq.kv_tokens)
                budget -= n
        return ScheduledBatch(tuple(prefill), tuple(decode), tuple(preempted), tuple(chunks), tuple(cached),
                              tuple(swapped_in), tuple(swaps))

    def _cached_prefix(self, seq: Sequence) -> int:
        """Prompt tokens a prefix-caching policy already holds for ``seq`` (0 without one).
        At least one token is always left to compute: it gives the logits to sample from."""
        hit = getattr(self.policy, "cached_prefix_tokens", None)
        n = int(hit(seq.request_id)) if hit is not None else 0
        assert 0 <= n < seq.num_tokens, f"{seq.request_id}: {n} cached of {seq.num_tokens} tokens"
        return n

    def _predict_head(self) -> None:
        """Predict lengths for the head of the queue, in one batch, just before admission,
        so predictors that learn online use everything finished so far."""
        if self.predictor is None or not self.waiting or self.waiting[0].prediction is not None:
            return
        todo = [s for s in itertools.islice(self.waiting, PREDICT_BATCH) if s.prediction is None and s.features is not None]
        for s, p in zip(todo, self.predictor.predict_batch([s.features for s in todo])):
            s.prediction = p

    def _forget_locations(self, request_ids: tuple[str, ...]) -> None:
        ids = set(request_ids)
        for s in self.running:
            if s.request_id in ids:
                s.kv_location = None

    def location(self, seq: Sequence) -> KVLocation:
        """The sequence's KV runs; cached on the sequence until the policy reports a change
        (a reservation, or a growth whose ``GrowResult.how`` is set)."""
        if seq.kv_location is None:
            seq.kv_location = self.policy.location(seq.request_id)
        return seq.kv_location

    # -- after the step ----------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, finished: Iterable[Sequence]) -> None:
        """Account the step: every scheduled sequence computed the KV of its chunk (a decode:
        its newest token); completed prompts tell a prefix-caching policy what is ready."""
        noted = getattr(self.policy, "note_computed", None)
        if batch.prefill:
            self._running_dirty = True  # completed prefills now decode: they sort first
        for seq, n in zip(batch.prefill, batch.prefill_chunk_tokens):
            seq.kv_tokens += n
            if noted is not None:
                noted(seq.request_id, seq.kv_tokens)
        for seq in batch.decode:
            seq.kv_tokens += 1
        for seq in finished:
            seq.status = SeqStatus.FINISHED
            self.running.remove(seq)
            self._submitted.pop(seq.request_id, None)
            self.policy.release(seq.request_id, seq.num_generated)
            seq.kv_location = None
            if self.predictor is not None and seq.features is not None:
                self.predictor.observe(seq.features, seq.num_generated)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is; its KV (if any) is freed."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._submitted.pop(request_id, None)
                self._release_swap(seq)
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
        """KV tokens written by the running requests, plus their rings' rows (sliding-window
        models keep those in the arena too: kvcache/window.py)."""
        rings = getattr(self.policy, "live_ring_rows", None)
        return sum(s.kv_tokens for s in self.running) + (rings() if rings is not None else 0)
