"""Next-token sampling and stop conditions.

Reproducibility contract: a request with ``seed`` set produces the same tokens whatever
else is in the batch, because each request owns a ``torch.Generator`` and every random draw
for its row comes from that generator alone (one exponential vector per step, the
"exponential race" form of categorical sampling: argmax(p / E) with E ~ Exp(1) picks token
i with probability p_i). Greedy rows draw nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from odma_mlu.errors import RequestRejected

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops. ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all."""
    seed: int | None = None
    """Per-request seed; None draws one from the sampler's own generator."""
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the decoded text contains one (it is cut off)."""
    max_new_tokens: int = 256
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token (benchmarks)."""

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            raise RequestRejected(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestRejected(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise RequestRejected(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise RequestRejected(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise RequestRejected(f"stop strings must be non-empty strings, got {list(self.stop)}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise RequestRejected(f"stop_token_ids must be non-negative integers, got {list(self.stop_token_ids)}")
        # Lists from JSON would make the dataclass unhashable and mutable: freeze them.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class StopDecision:
    """Why a request finished (``finish_reason``: "stop" or "length") and where its text ends."""

    finish_reason: str
    text_end: int | None = None
    """For a stop string: the output text is cut here (the stop string is not returned)."""
    matched: str | int | None = None
    """The stop string or stop/eos token id that ended it."""


def check_stop(params: SamplingParams, output_token_ids: Sequence[int], output_text: str | None = None,
               eos_token_ids: Sequence[int] = (), text_checked_chars: int = 0) -> StopDecision | None:
    """Check a request after it received its latest token; None means "keep going".

    ``output_text`` is the decoded generated text (needed only with stop strings).
    ``text_checked_chars`` is how much of it was already checked on earlier steps: only the
    tail that could complete a stop string is searched again, so the check stays O(new text).
    Order: a stop token (or eos) wins over a stop string, which wins over the length limit.
    """
    if output_token_ids:
        last = int(output_token_ids[-1])
        if last in params.stop_token_ids or (not params.ignore_eos and last in eos_token_ids):
            return StopDecision(FINISH_STOP, None, last)
    if params.stop and output_text:
        longest = max(len(s) for s in params.stop)
        begin = max(0, text_checked_chars - longest + 1)
        hits = [(i, s) for s in params.stop if (i := output_text.find(s, begin)) >= 0]
        if hits:
            index, s = min(hits)
            return StopDecision(FINISH_STOP, index, s)
    if len(output_token_ids) >= params.max_new_tokens:
        return StopDecision(FINISH_LENGTH)
    return None


class Sampler:
    """Samples one next token per row of a logits batch, each row under its request's params."""

    def __init__(self, seed: int = 0) -> None:
        self._seed_source = torch.Generator().manual_seed(seed)

    def make_generator(self, params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator a request keeps for its whole life (seeded by ``params.seed`` if set)."""
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
        return torch.Generator(device=torch.device(device)).manual_seed(seed)

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> list[int]:
        """Next token id of each row of ``logits`` [B, V]; ``generators[i]`` may be None for greedy rows."""
        b, vocab = logits.shape
        assert len(params) == b == len(generators), \
            f"{b} logit rows, {len(params)} params, {len(generators)} generators"
        out = torch.argmax(logits, dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return out.tolist()
        sel = torch.tensor(rows, device=logits.device)
        x = logits.index_select(0, sel).float()
        temps = torch.tensor([params[i].temperature for i in rows], device=x.device, dtype=torch.float32)
        x = x / temps[:, None]
        top_ks = [params[i].top_k for i in rows]
        top_ps = [params[i].top_p for i in rows]
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
            x = _mask_top_k_top_p(x, top_ks, top_ps)
        probs = torch.softmax(x, dim=-1)
        for j, i in enumerate(rows):
            g = generators[i]
            assert g is not None, f"row {i} samples (temperature {params[i].temperature}) but has no generator"
            race = torch.empty(vocab, device=x.device, dtype=torch.float32).exponential_(generator=g)
            out[i] = torch.argmax(probs[j] / race)
        return out.tolist()


def _mask_top_k_top_p(x: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p set to -inf (always keeps the best token)."""
    vocab = x.shape[-1]
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    rank = torch.arange(vocab, device=x.device)[None, :]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_ks], device=x.device)[:, None]
    drop = rank >= k
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    p = torch.tensor(top_ps, device=x.device, dtype=torch.float32)[:, None]
    probs = torch.softmax(sorted_x, dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p.
    drop = drop | ((torch.cumsum(probs, dim=-1) - probs) >= p)
    drop[:, 0] = False
    return x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
