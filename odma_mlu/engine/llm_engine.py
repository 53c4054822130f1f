"""LLMEngine: add requests, step, abort, stream; the real model over the KV policies.

::

    add_request -> Scheduler.add (validated before any KV is reserved)
    step():  batch = scheduler.schedule()          (policy reserves / grows / preempts)
             logits = model.forward(batch, arena)   (prefill + decode in one varlen batch)
             tokens = sampler.sample(logits)        (per-request generators)
             stop checks -> scheduler.postprocess   (finished requests release their KV)

On the emulated backend each step also advances the virtual clock by the cost model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence as Seq

import torch

from odma_mlu.backends import Backend, get_backend
from odma_mlu.config import CacheConfig, SchedulerConfig
from odma_mlu.engine.request import Sequence
from odma_mlu.engine.sampler import Sampler, SamplingParams, check_stop
from odma_mlu.engine.scheduler import ScheduledBatch, Scheduler
from odma_mlu.errors import ConfigError, RequestRejected
from odma_mlu.kvcache.factory import make_policy
from odma_mlu.models.attention import ForwardBatch, SequenceInput
from odma_mlu.models.loader import load_model
from odma_mlu.predictor.base import LengthPredictor, RequestFeatures

StreamCallback = Callable[["RequestOutput"], None]


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None


@dataclass
class _Live:
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    callback: StreamCallback | None
    text: str = ""
    checked_chars: int = 0


class LLMEngine:
    def __init__(self, model_path: str | Path, *, kv_policy: str = "odma", backend: str | Backend = "auto",
                 dtype: str | None = None, kv_capacity_tokens: int = 4096, predictor: LengthPredictor | None = None,
                 cache: CacheConfig = CacheConfig(), scheduler: SchedulerConfig = SchedulerConfig(),
                 profile: str | None = None, seed: int = 0) -> None:
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend, profile=profile)
        self.model, self.spec, self.tokenizer = load_model(model_path, backend=self.backend, dtype=dtype)
        if kv_capacity_tokens <= 0:
            raise ConfigError(f"kv_capacity_tokens must be positive, got {kv_capacity_tokens}")
        self.arena = self.model.new_arena(kv_capacity_tokens)
        self.policy = make_policy(kv_policy, self.arena, cache, scheduler.max_new_tokens)
        self.scheduler = Scheduler(self.policy, scheduler, self.spec.max_position_embeddings, predictor)
        self.sampler = Sampler(seed)
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self.eos_token_ids = tuple(self.spec.eos_token_ids)
        self._cost = None
        if self.backend.name == "emulated":
            from emulator.cost_model import CostModel

            self._cost = CostModel(self.backend.profile, self.spec)  # type: ignore[attr-defined]

    # -- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | Seq[int], params: SamplingParams = SamplingParams(), *,
                    request_id: str | None = None, callback: StreamCallback | None = None,
                    true_output_tokens: int | None = None) -> str:
        """Queue a request; raises RequestRejected (nothing reserved) if it can never run."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRejected("this engine has no tokenizer: pass token ids")
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
            text = prompt
        else:
            ids = [int(t) for t in prompt]
            text = None
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
        self.scheduler.add(seq)  # validates before anything is reserved
        gen = self.sampler.make_generator(params, self.model.device) if not params.greedy else None
        self._live[rid] = _Live(seq, params, gen, callback)
        return rid

    def abort(self, request_id: str) -> bool:
        live = self._live.pop(request_id, None)
        if live is None:
            return False
        self.scheduler.abort(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- one step -------------------------------------------------------------------------
    def _forward_inputs(self, batch: ScheduledBatch) -> list[SequenceInput]:
        inputs = []
        for s in batch.prefill:  # whole prompt (+ regenerated tokens after a preemption)
            inputs.append(SequenceInput(tuple(s.all_token_ids()), 0, self.scheduler.location(s)))
        for s in batch.decode:
            inputs.append(SequenceInput((s.all_token_ids()[-1],), s.num_tokens - 1, self.scheduler.location(s)))
        return inputs

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        seqs = batch.all_seqs()
        fb = ForwardBatch.build(self._forward_inputs(batch), device=self.model.device)
        logits = self.model.forward(fb, self.arena)
        lives = [self._live[s.request_id] for s in seqs]
        next_ids = self.sampler.sample(logits, [lv.params for lv in lives], [lv.generator for lv in lives])
        if self._cost is not None:
            cost = self._cost.step([s.num_tokens for s in batch.prefill], [s.num_tokens - 1 for s in batch.decode],
                                   self.policy.layout, num_decode_groups=len(fb.decode_groups))
            self.backend.advance(cost.time_s)  # type: ignore[attr-defined]
        outputs: list[RequestOutput] = []
        finished: list[Sequence] = []
        for s, lv, tok in zip(seqs, lives, next_ids):
            s.output_token_ids.append(int(tok))
            s.num_generated += 1
            text = None
            if lv.params.stop and self.tokenizer is not None:
                lv.text = self.tokenizer.decode(s.output_token_ids, skip_special_tokens=True)
                text = lv.text
            stop = check_stop(lv.params, s.output_token_ids, text, self.eos_token_ids, lv.checked_chars)
            if text is not None:
                lv.checked_chars = len(text)
            if stop is None and s.num_generated >= s.max_new_tokens:
                reason: str | None = "length"
            else:
                reason = stop.finish_reason if stop is not None else None
            if reason is not None:
                s.finish_reason = reason
                finished.append(s)
            out = RequestOutput(s.request_id, (int(tok),), tuple(s.output_token_ids), lv.text, reason is not None,
                                reason)
            outputs.append(out)
            if lv.callback is not None:
                lv.callback(out)
        self.scheduler.postprocess(batch, finished)
        for s in finished:
            self._live.pop(s.request_id, None)
        return outputs

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
