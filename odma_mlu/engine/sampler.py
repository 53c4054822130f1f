"""Next-token sampling, logit processors, log-probabilities and stop conditions.

Reproducibility contract: a request with ``seed`` set produces the same tokens whatever
else is in the batch, because each request owns a ``torch.Generator`` and every random draw
for its row comes from that generator alone (one exponential vector per step, the
"exponential race" form of categorical sampling: argmax(p / E) with E ~ Exp(1) picks token
i with probability p_i). Greedy rows draw nothing.

Everything else is one vectorized pass over the batch, whatever mix of per-request
parameters it holds: ``min_tokens`` masks (stop and end-of-sequence ids set to -inf until
enough tokens exist), repetition / presence / frequency penalties (over the rows that ask for
them, from one scatter of their token counts), temperature, top-k / top-p, the race, and the
log-probabilities of the raw model distribution (as vLLM and OpenAI report them). A row with
no processor active takes the plain argmax of the model's logits, so greedy output stays
token-identical to transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from odma_mlu.errors import RequestRejected

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

MAX_LOGPROBS = 20
"""Most alternatives a request may ask for (``logprobs`` / ``top_logprobs``), as OpenAI."""
MAX_TOP_K = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""What ``torch.Generator.manual_seed`` accepts."""
MAX_TOKEN_ID = 2**31 - 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    min_tokens: int = 0
    """No stop token, end-of-sequence token or stop string ends the request before this many
    tokens (the ids are masked out of the distribution, as vLLM does)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token (benchmarks)."""
    presence_penalty: float = 0.0
    """OpenAI: subtracted from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI: times the count of each token already generated, subtracted, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """CTRL / transformers: logits of tokens in the prompt or output are divided by it when
    positive and multiplied when negative; 1 = off, in (0, 10]."""
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many top alternatives (0..20);
    None returns none."""

    def __post_init__(self) -> None:
        def no(msg: str) -> RequestRejected:
            return RequestRejected(msg)

        if not _is_num(self.temperature) or self.temperature < 0:
            raise no(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise no(f"top_k must be an integer >= 0 (0 = off) and <= {MAX_TOP_K}, got {self.top_k!r}")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise no(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise no(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise no(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise no(f"min_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], "
                     f"got {self.min_tokens!r}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise no(f"stop strings must be non-empty strings, got {list(self.stop)}")
        if any(not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids):
            raise no(f"stop_token_ids must be non-negative integers <= {MAX_TOKEN_ID}, "
                     f"got {list(self.stop_token_ids)[:8]}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                raise no(f"{name} must be a number in [-2, 2] (0 = off), got {v!r}")
        if not _is_num(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise no(f"repetition_penalty must be a number in (0, 10] (1 = off), got {self.repetition_penalty!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise no(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise no(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        # Lists from JSON would make the dataclass unhashable and mutable: freeze them.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "temperature", float(self.temperature))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


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
    Before ``min_tokens`` tokens exist only the length limit applies.
    """
    n = len(output_token_ids)
    if n >= params.min_tokens:
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
    if n >= params.max_new_tokens:
        return StopDecision(FINISH_LENGTH)
    return None


class IncrementalDecoder:
    """Text of a growing token list, decoded in O(new tokens) per step.

    The newest tokens are decoded together with the few before them (byte-level BPE splits
    one character over several tokens; some tokenizers merge spaces across tokens), and text
    is released only when it no longer ends in an incomplete character (U+FFFD). ``text`` is
    everything released so far.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._prefix = 0  # start of the window decoded for context
        self._read = 0    # tokens whose text is already released
        self.text = ""

    def update(self, token_ids: Sequence[int]) -> str:
        """Feed the whole token list so far; returns the newly released text."""
        if self._tok is None or len(token_ids) <= self._read:
            return ""
        ids = list(token_ids)
        before = self._tok.decode(ids[self._prefix:self._read], skip_special_tokens=self._skip)
        after = self._tok.decode(ids[self._prefix:], skip_special_tokens=self._skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before):]
            self._prefix, self._read = self._read, len(ids)
            self.text += new
            return new
        return ""

    def flush(self, token_ids: Sequence[int]) -> str:
        """At the end: whatever is still held (an incomplete character decodes as U+FFFD)."""
        if self._tok is None or len(token_ids) <= self._read:
            return ""
        ids = list(token_ids)
        before = self._tok.decode(ids[self._prefix:self._read], skip_special_tokens=self._skip)
        after = self._tok.decode(ids[self._prefix:], skip_special_tokens=self._skip)
        new = after[len(before):] if after.startswith(before) else after
        self._prefix = self._read = len(ids)
        self.text += new
        return new


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability under the model and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs to know of one request besides its logits row."""

    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    eos_token_ids: Sequence[int] = ()


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)


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
        assert len(params) == len(generators), f"{len(params)} params, {len(generators)} generators"
        return self.sample_rows(logits, [SampleRow(p, g) for p, g in zip(params, generators)]).token_ids

    def sample_rows(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> SampleResult:
        """Next token (and log-probabilities where asked) of each row; see the module docstring."""
        b, vocab = logits.shape
        assert len(rows) == b, f"{b} logit rows, {len(rows)} requests"
        x = logits
        # 1. min_tokens: stop and eos ids cannot be drawn yet.
        mask_rows, mask_cols = [], []
        for i, r in enumerate(rows):
            p = r.params
            if p.min_tokens and len(r.output_token_ids) < p.min_tokens:
                ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
                for t in ids:
                    if t < vocab:
                        mask_rows.append(i)
                        mask_cols.append(t)
        # 2. penalties, over the rows that ask for them.
        pen = [i for i, r in enumerate(rows) if r.params.penalized]
        if mask_rows or pen:
            x = x.float().clone()
        if mask_rows:
            x[torch.tensor(mask_rows, device=x.device), torch.tensor(mask_cols, device=x.device)] = float("-inf")
        if pen:
            x = _apply_penalties(x, [rows[i] for i in pen], pen)
        out = torch.argmax(x, dim=-1)
        # 3. temperature, top-k / top-p and the race, over the sampling rows.
        samp = [i for i, r in enumerate(rows) if not r.params.greedy]
        if samp:
            sel = torch.tensor(samp, device=logits.device)
            xs = x.index_select(0, sel).float()
            temps = torch.tensor([rows[i].params.temperature for i in samp], device=xs.device, dtype=torch.float32)
            xs = xs / temps[:, None]
            top_ks = [min(rows[i].params.top_k, vocab) for i in samp]
            top_ps = [float(rows[i].params.top_p) for i in samp]
            if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
                xs = _mask_top_k_top_p(xs, top_ks, top_ps)
            probs = torch.softmax(xs, dim=-1)
            race = torch.empty_like(probs)
            for j, i in enumerate(samp):
                g = rows[i].generator
                assert g is not None, f"row {i} samples (temperature {rows[i].params.temperature}) but has no generator"
                race[j].exponential_(generator=g)
            out[sel] = torch.argmax(probs / race, dim=-1)
        token_ids = out.tolist()
        # 4. log-probabilities of the raw model distribution.
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        logprobs: list[TokenLogprobs | None] = [None] * b
        if want:
            sel = torch.tensor(want, device=logits.device)
            lp = torch.log_softmax(logits.index_select(0, sel).float(), dim=-1)
            chosen = lp.gather(1, out.index_select(0, sel)[:, None]).squeeze(1).tolist()
            k = max(rows[i].params.logprobs or 0 for i in want)
            top_v, top_i = (lp.topk(k, dim=-1) if k else (None, None))
            for j, i in enumerate(want):
                n = rows[i].params.logprobs or 0
                top = tuple(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist())) if n else ()
                logprobs[i] = TokenLogprobs(token_ids[i], float(chosen[j]), top)
        return SampleResult(token_ids, logprobs)


def _apply_penalties(x: torch.Tensor, rows: Sequence[SampleRow], index: Sequence[int]) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output) penalties on rows ``index``."""
    vocab = x.shape[1]
    dev = x.device
    n = len(rows)

    def counts(seqs: list[Sequence[int]]) -> torch.Tensor:
        c = torch.zeros(n, vocab + 1, device=dev, dtype=torch.float32)
        longest = max((len(s) for s in seqs), default=0)
        if longest:
            ids = torch.full((n, longest), vocab, device=dev, dtype=torch.long)  # pad to the spare column
            for j, s in enumerate(seqs):
                if len(s):
                    ids[j, :len(s)] = torch.as_tensor(list(s), device=dev).clamp_(0, vocab)
            c.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
        return c[:, :vocab]

    out_counts = counts([r.output_token_ids for r in rows])
    sel = torch.tensor(list(index), device=dev)
    xs = x.index_select(0, sel)
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=dev, dtype=torch.float32)[:, None]
    if bool((rep != 1.0).any()):
        seen = (out_counts + counts([r.prompt_token_ids for r in rows])) > 0
        xs = torch.where(seen, torch.where(xs > 0, xs / rep, xs * rep), xs)
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev, dtype=torch.float32)[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev, dtype=torch.float32)[:, None]
    xs = xs - freq * out_counts - pres * (out_counts > 0).float()
    x[sel] = xs
    return x


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
