"""LLMEngine: add requests, step, abort, stream; the real model over the KV policies.

::

    add_request -> Scheduler.add (validated before any KV is reserved)
    step():  batch = scheduler.schedule()          (policy reserves / grows / preempts;
                                                    a swapped-out request's KV goes to the host)
             swapped-in KV written back             (before the forward reads it)
             logits = model.forward(batch, arena)   (prefill + decode in one varlen batch)
             tokens = sampler.sample_rows(logits)   (vectorized; per-request generators)
             stop checks -> scheduler.postprocess   (finished requests release their KV)

A failure tied to one request (its sampling row, its stop check, its stream callback) ends
that request alone with ``finish_reason == "error"`` and frees its KV; the others go on. A
failed forward fails the requests of that batch and frees their KV; ``MAX_FORWARD_FAILURES``
failed forwards in a row mean the engine itself is broken, and ``step`` raises.

On the emulated backend each step also advances the virtual clock by the cost model.
"""

from __future__ import annotations

import gc
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence as Seq

import torch

from odma_mlu.backends import Backend, get_backend
from odma_mlu.config import CacheConfig, SchedulerConfig
from odma_mlu.engine.graph_runner import DecodeGraphRunner, StepPricer
from odma_mlu.engine.request import Sequence
from odma_mlu.engine.sampler import (FINISH_LENGTH, IncrementalDecoder, SampleResult, SampleRow, Sampler,
                                     SamplingParams, TokenLogprobs, check_stop)
from odma_mlu.engine.scheduler import ScheduledBatch, Scheduler
from odma_mlu.engine.request_log import RequestLog
from odma_mlu.engine.step_work import StepWork, describe_step
from odma_mlu.errors import ConfigError, RequestRejected
from odma_mlu.kvcache.arena import HostKV, KVLocation
from odma_mlu.kvcache.factory import make_policy
from odma_mlu.kvcache.prefix import PrefixCachingPolicy
from odma_mlu.kvcache.windowed import WindowedPolicy
from odma_mlu.models.attention import ForwardBatch, SequenceInput
from odma_mlu.models.layer_kinds import LayerKinds
from odma_mlu.models.loader import load_model
from odma_mlu.models.split_reads import PLAIN_LSE_KERNELS, has_fused_lse
from odma_mlu.predictor.base import LengthPredictor, RequestFeatures

StreamCallback = Callable[["RequestOutput"], None]
log = logging.getLogger("odma_mlu.engine")

FINISH_ERROR = "error"
MAX_FORWARD_FAILURES = 3


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None
    """Of the newest token, when the request asked for ``logprobs``."""
    error: str | None = None
    """Why the request failed alone (``finish_reason == "error"``); None otherwise."""


@dataclass
class _Live:
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    callback: StreamCallback | None
    decoder: IncrementalDecoder | None = None
    text: str = ""
    checked_chars: int = 0


class LLMEngine:
    def __init__(self, model_path: str | Path, *, kv_policy: str = "odma", backend: str | Backend = "auto",
                 dtype: str | None = None, kv_capacity_tokens: int = 4096, predictor: LengthPredictor | None = None,
                 cache: CacheConfig = CacheConfig(), scheduler: SchedulerConfig = SchedulerConfig(),
                 profile: str | None = None, seed: int = 0,
                 decode_graphs: bool | None = None, request_log: str | Path | None = None) -> None:
        """``kv_capacity_tokens``: tokens of K/V over every layer. A model with sliding layers
        gets one arena of its full layers for that whole budget (``kv_capacity_tokens *
        num_layers // num_full_layers`` slots); each request's ring lives there too, reserved
        through the same KV policy (kvcache/window.py).
        ``decode_graphs``: replay decode-only steps from captured device graphs
        (engine/graph_runner.py); None = where the backend has graphs (CUDA, MLU; never CPU),
        True on a backend without graphs runs the same padded static path eagerly.
        ``request_log``: append each finished request (prompt, output length) to this JSONL
        file, the format ``odma-mlu predictor train`` reads (engine/request_log.py).
        ``profile``: a device profile (name or YAML path). With ``backend="emulated"`` the card
        it emulates; on a real backend the card's own profile, whose costs ODMA's rules use
        (how far ahead a growing request holds, whether a copy or a move pays); None: those
        rules are off (ODMA holds ``chunk_tokens`` ahead, never copies or moves)."""
        self.request_log = RequestLog(request_log) if request_log is not None else None
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend, profile=profile)
        self.model, self.spec, self.tokenizer = load_model(model_path, backend=self.backend, dtype=dtype)
        if kv_capacity_tokens <= 0:
            raise ConfigError(f"kv_capacity_tokens must be positive, got {kv_capacity_tokens}")
        windowed = getattr(self.model, "window_tokens", None) is not None
        arena_tokens = kv_capacity_tokens
        if windowed:  # the whole budget in slots of the full layers (rings take their share as rows)
            arena_tokens = kv_capacity_tokens * self.spec.num_layers // self.model.num_full_layers
        self.arena = self.model.new_arena(arena_tokens)
        run_cost = self.backend.kv_run_cost()
        self.priced_by: str | None = None
        """The profile pricing ODMA's decisions on a real backend (None: emulated, or unpriced)."""
        if run_cost is None and profile is not None:  # a real card priced by its own profile
            from odma_mlu.backends.emulated import profile_run_cost

            run_cost = profile_run_cost(profile, self.spec, LayerKinds.of_model(self.model), self.backend.name)
            self.priced_by = profile
        fused = has_fused_lse(self.model.device.type, self.model.dtype, self.spec.head_dim)
        self.views = (run_cost.view_rule(None if fused else PLAIN_LSE_KERNELS) if run_cost is not None
                      else None)
        """Where decodes are read in place, alone or in parts (``StepWork.build``'s rule); from
        the profile, a split read's part priced as this device runs it; None without one."""
        self.policy = make_policy(kv_policy, self.arena, cache, scheduler.max_new_tokens, run_cost=run_cost)
        if cache.enable_prefix_caching:
            if windowed or getattr(self.model, "is_hybrid", False):
                raise ConfigError("enable_prefix_caching: prefix sharing needs a full-attention model; this one has "
                                  "sliding-window or SSM layers (their rings and states are per request)")
            self.policy = PrefixCachingPolicy(self.policy)
        self.windows = self.model.new_window_pool(self.arena) if windowed else None
        if self.windows is not None:  # admission also reserves a ring, growth grows it, release frees it
            self.policy = WindowedPolicy(self.policy, self.windows)
        self.states = None
        if getattr(self.model, "is_hybrid", False):  # SSM state slots; capacity moves between pools (AVMP)
            from odma_mlu.kvcache.avmp import AvmpPolicy

            self.states = self.model.new_state_pool(0)
            self.policy = AvmpPolicy(self.policy, self.states, self.model.hybrid.kv_bytes_per_token)
        # Preempted requests swap their KV (and a ring's rows) to host memory where the policy is
        # ``swappable`` (no SSM states or shared prefix pages); elsewhere they recompute.
        self._host_kv: dict[str, tuple[HostKV, ...]] = {}
        self.scheduler = Scheduler(
            self.policy, scheduler, self.spec.max_position_embeddings, predictor,
            swap_capacity_tokens=self.backend.swap_capacity_tokens(cache.swap_space_bytes, self.arena.bytes_per_token),
            on_swap_out=self._swap_out)
        self.sampler = Sampler(seed)
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self.eos_token_ids = tuple(self.spec.eos_token_ids)
        self._forward_failures = 0
        self.runner: DecodeGraphRunner | None = None
        plain = self.windows is None and self.states is None
        if decode_graphs is None:
            decode_graphs = plain and self.backend.new_graph() is not None
        if decode_graphs:
            if not plain:
                raise ConfigError("decode_graphs: graph capture covers models whose every layer reads the KV arena; "
                                  "this one has sliding-window or SSM layers")
            self.runner = DecodeGraphRunner(self.model, self.arena, self.backend, max_batch=scheduler.max_num_seqs,
                                            use_graphs=self.backend.new_graph() is not None,
                                            pricer=run_cost if isinstance(run_cost, StepPricer) else None,
                                            views=self.views)
        # Everything built so far (model, tokenizer, imports) lives as long as the engine: move it
        # out of the cycle collector's reach, or each full collection walks it (tens of ms, a
        # stall of every stream; vLLM does the same after start-up).
        gc.collect()
        gc.freeze()

    # -- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | Seq[int], params: SamplingParams = SamplingParams(), *,
                    request_id: str | None = None, callback: StreamCallback | None = None,
                    true_output_tokens: int | None = None, prompt_text: str | None = None) -> str:
        """Queue a request; raises RequestRejected (nothing reserved) if it can never run.

        ``prompt`` as token ids skips tokenization here (the server tokenizes off the engine
        thread); ``prompt_text`` then still gives the length predictor its text features.
        Everything that can fail is done before the scheduler sees the request, so a
        rejected request leaves nothing behind."""
        if not isinstance(params, SamplingParams):
            raise RequestRejected(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRejected("this engine has no tokenizer: pass token ids")
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
            text = prompt
        else:
            if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
                raise RequestRejected("prompt token ids must be integers")
            ids = [int(t) for t in prompt]
            text = prompt_text
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RequestRejected(f"prompt token ids {bad[:5]} outside the vocabulary [0, {self.spec.vocab_size})")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._live:
            raise RequestRejected(f"request id {rid!r} is already in use")
        max_new = min(params.max_new_tokens, self.scheduler.config.max_new_tokens)
        if params.max_new_tokens > self.scheduler.config.max_new_tokens:
            raise RequestRejected(f"max_new_tokens {params.max_new_tokens} exceeds the engine limit "
                                  f"{self.scheduler.config.max_new_tokens}; lower it or raise "
                                  "SchedulerConfig.max_new_tokens")
        seq = Sequence(request_id=rid, prompt_tokens=len(ids), max_new_tokens=max_new, prompt_token_ids=ids,
                       features=RequestFeatures(len(ids), max_new, text, params.temperature),
                       true_output_tokens=true_output_tokens)
        gen = self.sampler.make_generator(params, self.model.device) if not params.greedy else None
        decoder = IncrementalDecoder(self.tokenizer) if params.stop and self.tokenizer is not None else None
        self.scheduler.add(seq)  # validates before anything is reserved; the last thing that may fail
        self._live[rid] = _Live(seq, params, gen, callback, decoder)
        return rid

    def abort(self, request_id: str) -> bool:
        live = self._live.pop(request_id, None)
        if live is None:
            return False
        self.scheduler.abort(request_id)
        self._host_kv.pop(request_id, None)
        return True

    def _swap_out(self, seq: Sequence, location: KVLocation) -> None:
        """The scheduler preempts ``seq`` by swapping: keep its computed KV on the host, with
        the rows of its ring where the model has sliding layers. The policy says what goes
        (``swap_locations``, ``swap_slots``; ``location`` is the first of them)."""
        rid = seq.request_id
        self._host_kv[rid] = tuple(self.arena.swap_out(loc, n) for loc, n in
                                   zip(self.policy.swap_locations(rid), self.policy.swap_slots(rid, seq.kv_tokens)))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- one step -------------------------------------------------------------------------
    def _forward_inputs(self, batch: ScheduledBatch) -> list[SequenceInput]:
        """Each sequence's new tokens this step: a prefill chunk (a slice of its token list),
        or a decode's last token; O(1) per decode, O(chunk) per prefill."""
        sched = self.scheduler
        inputs = []
        for s, new, cached in zip(batch.prefill, batch.prefill_chunk_tokens, batch.prefill_cached_tokens):
            inputs.append(SequenceInput(tuple(s.token_ids[cached:cached + new]), cached, sched.location(s)))
        for s in batch.decode:
            inputs.append(SequenceInput((s.last_token_id,), s.num_tokens - 1, sched.location(s)))
        return inputs

    def _describe(self, batch: ScheduledBatch) -> StepWork | None:
        """The step's ``StepWork`` where the backend prices steps (emulated); elsewhere only
        the arena's issued copies are drained (describing costs Python per sequence)."""
        if self.backend.prices_steps:
            return describe_step(batch, self.policy, self.views)
        self.arena.take_issued_copies()
        return None

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        seqs = batch.all_seqs()
        work = self._describe(batch)  # drains the KV copies the policy issued
        inputs = self._forward_inputs(batch)
        graph = self.runner is not None and not batch.prefill and self.runner.fits(inputs)
        fb = None if graph else ForwardBatch.build(inputs, device=self.model.device, views=self.views)
        try:
            for s in batch.swapped_in:  # their new runs are reserved: write the KV back before it is read
                for loc, kv in zip(self.policy.swap_locations(s.request_id), self._host_kv.pop(s.request_id)):
                    self.arena.swap_in(loc, kv)
            if fb is None:
                assert self.runner is not None
                logits = self.runner.run(inputs)
            elif self.states is not None:
                logits = self.model.forward(fb, self.arena, self.states,
                                            [self.states.slot_of(s.request_id) for s in seqs])
            elif self.windows is None:
                logits = self.model.forward(fb, self.arena)
            else:
                rings = self.windows.plan(fb, [s.request_id for s in seqs], self.model.device)
                logits = self.model.forward(fb, self.arena, rings)
        except Exception as e:  # noqa: BLE001 - see the module docstring
            return self._fail_batch(seqs, e)
        self._forward_failures = 0
        sampled_seqs = batch.sampled
        if len(sampled_seqs) != len(seqs):  # unfinished prompt chunks: their logits are not used
            done = {id(s) for s in sampled_seqs}
            rows = [i for i, s in enumerate(seqs) if id(s) in done]
            logits = logits.index_select(0, torch.tensor(rows, dtype=torch.int64, device=logits.device))
        lives = [self._live[s.request_id] for s in sampled_seqs]
        sampled, sample_errors = (self._sample(logits, sampled_seqs, lives) if sampled_seqs
                                  else (SampleResult([], []), {}))
        if work is not None:
            self.backend.account_step(work)
        outputs: list[RequestOutput] = []
        finished: list[Sequence] = []
        failed: dict[str, str] = {}
        for i, (s, lv) in enumerate(zip(sampled_seqs, lives)):
            try:
                if i in sample_errors:
                    raise RuntimeError(sample_errors[i])
                out = self._advance(s, lv, sampled.token_ids[i], sampled.logprobs[i])
            except Exception as e:  # noqa: BLE001 - this request alone fails
                log.error("request %s failed in step: %s", s.request_id, e, exc_info=True)
                failed[s.request_id] = f"{type(e).__name__}: {e}"
                continue
            if out.finished:
                finished.append(s)
            outputs.append(out)
            if lv.callback is not None:
                try:
                    lv.callback(out)
                except Exception as e:  # noqa: BLE001 - a broken consumer ends its own request
                    log.error("stream callback of %s failed: %s", s.request_id, e, exc_info=True)
                    if not out.finished:
                        failed[s.request_id] = f"stream callback failed: {type(e).__name__}: {e}"
        self.scheduler.postprocess(batch, finished)
        for s in finished:
            self._live.pop(s.request_id, None)
            if self.request_log is not None:
                self.request_log.record(s)
        for rid, message in failed.items():
            outputs.append(self._fail(rid, message))
        return outputs

    def _sample(self, logits: torch.Tensor, seqs: Seq[Sequence], lives: Seq[_Live]
                ) -> tuple[SampleResult, dict[int, str]]:
        """Sample the whole batch at once; if that raises, row by row, so a row that cannot be
        sampled fails alone (its index -> message)."""
        rows = [SampleRow(lv.params, lv.generator, s.prompt_token_ids or (), s.output_token_ids, self.eos_token_ids)
                for s, lv in zip(seqs, lives)]
        try:
            return self.sampler.sample_rows(logits, rows), {}
        except Exception:  # noqa: BLE001 - isolate the culprit below
            log.warning("batched sampling failed; sampling row by row", exc_info=True)
        tokens: list[int] = []
        logprobs: list[TokenLogprobs | None] = []
        errors: dict[int, str] = {}
        for i, row in enumerate(rows):
            try:
                r = self.sampler.sample_rows(logits[i:i + 1], [row])
                tokens.append(r.token_ids[0])
                logprobs.append(r.logprobs[0])
            except Exception as e:  # noqa: BLE001
                errors[i] = f"sampling failed: {type(e).__name__}: {e}"
                tokens.append(-1)
                logprobs.append(None)
        return SampleResult(tokens, logprobs), errors

    def _advance(self, s: Sequence, lv: _Live, tok: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        """Append the sampled token and run the stop checks (incremental over the new text)."""
        s.append_token(int(tok))
        text = None
        if lv.decoder is not None:
            lv.decoder.update(s.output_token_ids)
            lv.text = text = lv.decoder.text
        stop = check_stop(lv.params, s.output_token_ids, text, self.eos_token_ids, lv.checked_chars)
        if text is not None:
            lv.checked_chars = len(text)
        if stop is None and s.num_generated >= s.max_new_tokens:
            reason: str | None = FINISH_LENGTH
        else:
            reason = stop.finish_reason if stop is not None else None
        if reason is not None:
            s.finish_reason = reason
        return RequestOutput(s.request_id, (int(tok),), tuple(s.output_token_ids), lv.text, reason is not None,
                             reason, logprobs)

    def _fail(self, request_id: str, message: str) -> RequestOutput:
        """End one request with ``finish_reason == "error"``; its KV is freed."""
        live = self._live.pop(request_id, None)
        self.scheduler.abort(request_id)
        self._host_kv.pop(request_id, None)
        tokens = tuple(live.seq.output_token_ids) if live is not None else ()
        return RequestOutput(request_id, (), tokens, live.text if live is not None else "", True, FINISH_ERROR,
                             None, message)

    def _fail_batch(self, seqs: Seq[Sequence], error: Exception) -> list[RequestOutput]:
        """A forward failed: its requests fail (their KV state is unknown) and free their KV."""
        self._forward_failures += 1
        log.error("forward failed (%d in a row) for %d requests", self._forward_failures, len(seqs), exc_info=True)
        if self._forward_failures >= MAX_FORWARD_FAILURES:
            raise RuntimeError(f"{self._forward_failures} forward passes failed in a row; last: "
                               f"{type(error).__name__}: {error}") from error
        message = f"the model forward failed: {type(error).__name__}: {error}"
        return [self._fail(s.request_id, message) for s in seqs]

    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] = SamplingParams(),
                 ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        last: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                last[out.request_id] = out
        return [last[i] for i in ids]

    def decode(self, token_ids: Seq[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True) if self.tokenizer else ""
