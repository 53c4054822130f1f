"""The scheduling loop of the shape-only hybrid (SSM + attention) replay, emulator/hybrid_replay.py.

That replay prices memory schemes that are not ``KVPolicy`` objects (per-layer-kind pools,
state pools), so it does not run ``odma_mlu.engine.scheduler.Scheduler``; it runs its
rules on shape-only sequences, here:

    1. running (oldest first): make room for the tokens this step writes; on failure
       preempt the newest running request (recompute), or this one when it is the last
    2. waiting (FCFS; preempted requests return to the front): admit while memory admits
       and the limits on sequences and batched tokens allow (one over-budget prompt may run
       alone as the step's first prefill); never admit in a step that had to preempt,
       unless nothing is left running
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class ShapeSeq:
    """A request in a shape-only replay: prompt and output lengths, tokens generated so far."""
    rid: str
    prompt: int
    output: int
    generated: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt + self.generated


@dataclass
class ShapeStep:
    prefill: list[ShapeSeq]
    decode: list[ShapeSeq]
    preemptions: int


def schedule_shape_step(running: list[ShapeSeq], waiting: list[ShapeSeq], grow: Callable[[str, int], bool],
                        preempt: Callable[[ShapeSeq], None], admit: Callable[[ShapeSeq], bool],
                        max_num_seqs: int, max_batched_tokens: int) -> ShapeStep:
    """One step's scheduling. ``running`` is oldest first; ``waiting`` is a stack whose head
    is ``waiting[-1]``. Both lists are updated in place. ``grow(rid, tokens)`` makes room for
    ``tokens``; ``preempt(seq)`` drops a victim's memory; ``admit(seq)`` reserves memory for
    a waiting request (False: no room now)."""
    preemptions = 0
    decode: list[ShapeSeq] = []
    queue = list(running)  # oldest first
    while queue:
        seq = queue.pop(0)
        while not grow(seq.rid, seq.tokens):
            victim = queue.pop() if queue else seq
            preempt(victim)
            running.remove(victim)
            waiting.append(victim)  # front of the queue; recomputed from prompt + generated
            preemptions += 1
            if victim is seq:
                break
        else:
            decode.append(seq)
    prefill: list[ShapeSeq] = []
    if not preemptions or not running:
        budget = max_batched_tokens - len(decode)
        while waiting and len(running) < max_num_seqs:
            seq = waiting[-1]
            if seq.tokens > budget and prefill:
                break
            if not admit(seq):
                break
            waiting.pop()
            running.append(seq)
            prefill.append(seq)
            budget -= seq.tokens
    return ShapeStep(prefill, decode, preemptions)
