"""ODMA's decisions priced by the device: how far ahead a growing request holds room (the
economic run length), whether copying a request into one run pays, and whether moving
another request's run out of a growing request's way pays.

All read a ``RunCost``: the emulator's ``CostModel`` of a device profile (the emulated
backend's, or on a real card the one its ``profile:`` names, ``backends.emulated.profile_run_cost``).
Without one, ODMA holds ``chunk_tokens`` ahead and never copies or moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import sqrt
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from odma_mlu.engine.step_work import ViewRule


class RunCost(Protocol):
    """What ODMA's pricing needs from the device: seconds to read one run of ``tokens`` of
    KV in every layer; what one more copy of ``tokens`` of KV adds to a step whose copies
    already number ``num_pending`` (its bytes, read + write in every layer, and the launches
    it adds: a step's copies run as one batch, ``KVArena.take_issued_copies``); a decode
    step's fixed part (weights, LM head, launches); and the length from which a decode in
    one run is read alone, in place, with the rule that decides it (``ViewRule``, which
    ``StepWork.build`` and the engine follow; None: never, where nothing is gathered)."""

    def read_run_s(self, tokens: int) -> float: ...

    def copy_s(self, tokens: int, num_pending: int = 0) -> float: ...

    def decode_fixed_s(self) -> float: ...

    def view_min_tokens(self) -> int | None: ...

    def view_rule(self, part_kernels: int | None = None) -> "ViewRule | None": ...


def split_s(cost: RunCost, unit_tokens: int, live_tokens: int) -> float:
    """What one more run costs on every read: a granule read apart from the ``live_tokens``
    run rather than as part of it."""
    return cost.read_run_s(unit_tokens) + cost.read_run_s(live_tokens) - cost.read_run_s(live_tokens + unit_tokens)


def expected_remaining_steps(claim_tokens: int, live_tokens: int, prompt_tokens: int) -> int:
    """The steps a request is expected to go on decoding: half its remaining claim (the claim
    covers ``target_coverage`` of requests like it), capped by its age, the tokens it has
    generated. The cap: the requests the copy rule picks are those whose estimate is
    largest, and for them the claim ran ~4x what they had left (qwen2-7b-swa/Alpaca,
    docs/odma-sensitivity.md); under heavy-tailed lengths a request is expected to live
    about as long again as it already has."""
    return max(1, min((claim_tokens - live_tokens) // 2, live_tokens - prompt_tokens))


def economic_run_tokens(cost: RunCost, unit_tokens: int, live_tokens: int, mean_tokens: float,
                        token_price_s: float) -> int:
    """The run length a growing request should hold ahead of its live tokens.

    Each time a request's right neighbour blocks it, it starts a run, which costs
    ``split_s`` on every later read (a granule read apart rather than as part of the live
    run). Holding ``h`` tokens ahead costs their memory, priced at ``token_price_s``: a
    step's fixed time shared by as many requests as the KV capacity holds, per token. Over
    a life of G tokens that is G / h runs, read G / 2 steps each on average, against h / 2
    tokens held over G steps; the sum is least at

        h* = sqrt(split_s * G / token_price_s)     (G: the mean completed length)

    the economic order quantity, with runs as orders and held tokens as stock. The derived
    MLU370-X4 profile (a page reads at 0.93 of a stream) gives h* < 16 for Alpaca and ~30
    for ServeGen; at 0.5 of a stream ~30 and ~110, at 0.3 ~45 and ~165
    (docs/odma-design.md, docs/odma-sensitivity.md)."""
    return round(sqrt(max(0.0, split_s(cost, unit_tokens, live_tokens)) * mean_tokens / token_price_s))


def copy_pays(cost: RunCost, run_tokens: Sequence[int], claim_tokens: int, live_tokens: int,
              prompt_tokens: int, num_pending: int = 0) -> bool:
    """Moving a request's live KV (held in runs of ``run_tokens``) into one run pays when
    the extra runs' read time over its expected remaining steps exceeds the copy.

    Without the copy the request goes on with its runs plus a new one for the rest of its
    claim; with it, one run. The steps: ``expected_remaining_steps``, each priced at the
    claim's full length (the largest read it would make). The copy: one per run of live
    tokens, joining the step's batch of ``num_pending`` copies."""
    expected_steps = expected_remaining_steps(claim_tokens, live_tokens, prompt_tokens)
    runs = list(run_tokens)
    runs.append(max(1, claim_tokens - sum(runs)))
    extra_s = sum(cost.read_run_s(n) for n in runs) - cost.read_run_s(sum(runs))
    copy_s, left = 0.0, live_tokens
    for n in run_tokens:
        if left <= 0:
            break
        copy_s += cost.copy_s(min(n, left), num_pending)
        num_pending += 1
        left -= n
    return expected_steps * extra_s > copy_s


def move_pays(cost: RunCost, unit_tokens: int, claim_tokens: int, live_tokens: int, prompt_tokens: int,
              moved_tokens: int, num_pending: int = 0) -> bool:
    """Moving the run that blocks a growing request (another request's, ``moved_tokens`` of
    it live) pays when the run the grower would start instead costs more over its expected
    remaining steps (``expected_remaining_steps`` of the grower's claim, live and prompt
    tokens) than copying the blocker: the grower then extends in place, and the
    blocker keeps its number of runs (it moves whole, into a hole that holds it). A blocker
    with nothing live yet (room held ahead of growth) moves for free. The copy joins the
    step's batch of ``num_pending`` copies."""
    if moved_tokens <= 0:
        return True
    expected_steps = expected_remaining_steps(claim_tokens, live_tokens, prompt_tokens)
    return expected_steps * split_s(cost, unit_tokens, live_tokens) > cost.copy_s(moved_tokens, num_pending)
