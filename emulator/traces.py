"""Trace readers: real request traces as one frozen ``Trace`` that replay and bench consume.

Why one reader module for five formats: replay must not care where a workload came from, only
when each request arrives, how long its prompt is and how many tokens it truly generates (the
length ODMA has to guess). Every format is reduced to exactly that, plus what the format
carries beyond it (prompt text for a text predictor, Mooncake prefix hashes, ServeGen reason
ratios) in ``metadata``.

Formats (detected from a file's contents, not trusted from its extension):
- Azure LLM inference CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``, TIMESTAMP a datetime.
- Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``.
- lengths JSONL (``lengths/*.jsonl`` and the bundled sample): ``prompt`` text and
  ``output_tokens``; the prompt's token count is *estimated* (see ``estimate_prompt_tokens``).
- Vidur length CSV: ``num_prefill_tokens,num_decode_tokens,...``, no timestamps.
- ServeGen client folder, or one ``chunk-N`` client: requests are *sampled* with ``seed``
  from its published distributions (``emulator/servegen.py``).

Bad input raises ``DataFormatError`` naming the file and line; a request is never dropped
silently.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping

import odma_mlu
from odma_mlu.errors import DataFormatError
from odma_mlu.predictor.data import iter_jsonl

#: The repository root (this file is ``<repo>/emulator/traces.py``).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Environment variable that overrides where named traces are looked up.
SHARED_DATA_ENV = "ODMA_SHARED_DATA"
#: The bundled default trace, found through the package so it also works when installed
#: (see ``odma_mlu/data/README.md`` for its source and license).
DEFAULT_TRACE_PATH = Path(odma_mlu.__file__).resolve().parent / "data" / "default_trace.jsonl"
#: Named traces, relative to the shared data folder.
NAMED_TRACES: Mapping[str, str] = {
    "alpaca-vicuna": "lengths/alpaca_vicuna7b_train.jsonl",
    "azure-code": "traces/azure_code_2023.csv",
    "mooncake": "traces/mooncake_synthetic.jsonl",
    "servegen-r1": "servegen_deepseek_r1",
    "sharegpt-dev": "sharegpt/sharegpt_pairs_dev.jsonl",
    "vidur-arxiv": "traces/vidur_arxiv_summarization_lengths.csv",
}
ACCEPTED_FORMATS = (
    "Azure CSV (header TIMESTAMP,ContextTokens,GeneratedTokens); "
    "Mooncake JSONL (timestamp ms, input_length, output_length, hash_ids); "
    "lengths JSONL (prompt, output_tokens); "
    "conversation pairs JSONL (prompt, response: both lengths from characters); "
    "Vidur CSV (header num_prefill_tokens,num_decode_tokens,...); "
    "ServeGen folder of chunk-N-trace.csv + chunk-N-dataset.json, or one chunk-N prefix"
)
#: Characters per token for prompts that come as text only. It is the same rule as
#: ``odma_mlu.predictor.data.LengthRecord.features`` so a predictor sees the prompt length
#: it was trained with; ~4 characters per token holds for English with LLaMA/Qwen tokenizers.
CHARS_PER_TOKEN = 4


def estimate_prompt_tokens(text: str) -> int:
    """Prompt tokens of ``text`` when no serving-model tokenizer is at hand:
    ``max(1, len(text) // 4)`` (characters, not bytes). An estimate, not a count: it sizes
    the prompt's KV footprint; only a trace with no token counts at all (conversation pairs)
    also sizes its replies by it."""
    return max(1, len(text) // CHARS_PER_TOKEN)


@dataclass(frozen=True)
class TraceRequest:
    """One request to replay. ``output_tokens`` is the true generation length; ``arrival_s``
    is seconds after the trace's first request (0 for formats without timestamps)."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prompt_text: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Trace:
    """A loaded trace, requests sorted by arrival. ``max_new_tokens`` is the generation cap
    the trace was recorded (or is sampled) under, or the caller's tighter cap; None when the
    trace has none (then the serving config's cap applies)."""

    name: str
    source: str
    requests: tuple[TraceRequest, ...]
    max_new_tokens: int | None

    def summary(self) -> dict[str, Any]:
        """Counts and length percentiles (nearest-rank) for reports and logs."""
        outs = sorted(r.output_tokens for r in self.requests)
        prompts = [r.prompt_tokens for r in self.requests]
        n = len(outs)
        return {
            "name": self.name,
            "count": n,
            "output_tokens_mean": sum(outs) / n if n else 0.0,
            "output_tokens_p50": _nearest_rank(outs, 0.50),
            "output_tokens_p99": _nearest_rank(outs, 0.99),
            "output_tokens_max": outs[-1] if n else 0,
            "prompt_tokens_mean": sum(prompts) / n if n else 0.0,
            "duration_s": self.requests[-1].arrival_s - self.requests[0].arrival_s if n else 0.0,
            "max_new_tokens": self.max_new_tokens,
        }


def _nearest_rank(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def default_shared_dir() -> Path:
    """``$ODMA_SHARED_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get(SHARED_DATA_ENV)
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def load_trace(name_or_path: str | os.PathLike[str] | None, *, seed: int = 0, max_requests: int | None = None,
               max_new_tokens: int | None = None, shared_dir: Path | None = None) -> Trace:
    """Load a trace by name (``NAMED_TRACES``), path, or None/"default" (the bundled sample).

    ``max_requests`` keeps the first N by arrival (for ServeGen: samples N, default
    ``servegen.DEFAULT_SAMPLED_REQUESTS``). ``max_new_tokens`` clips every ``output_tokens``
    to the cap, as a server would cut generation there. ``seed`` matters only for sampled
    (ServeGen) traces.
    """
    if max_requests is not None and max_requests < 1:
        raise DataFormatError(f"max_requests={max_requests}: must be >= 1 (or None for all)")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise DataFormatError(f"max_new_tokens={max_new_tokens}: must be >= 1 (or None for the trace's own cap)")
    name, path = _resolve(name_or_path, shared_dir)
    requests, own_cap = _read_any(path, seed=seed, max_requests=max_requests)
    if not requests:
        raise DataFormatError(f"{path}: no requests in the trace; expected one of: {ACCEPTED_FORMATS}")
    bad_time = next((r for r in requests if not math.isfinite(r.arrival_s)), None)
    if bad_time is not None:  # NaN sorts nowhere and an online replay would wait for it forever
        raise DataFormatError(f"{path}: request {bad_time.request_id!r} has arrival time {bad_time.arrival_s}; "
                              "timestamps must be finite numbers")
    requests.sort(key=lambda r: r.arrival_s)  # stable: file order breaks ties
    if max_requests is not None:
        requests = requests[:max_requests]
    t0 = requests[0].arrival_s
    cap = own_cap if max_new_tokens is None else min(max_new_tokens, own_cap or max_new_tokens)
    requests = [_rebase(r, t0, cap) for r in requests]
    return Trace(name=name, source=str(path), requests=tuple(requests), max_new_tokens=cap)


def _rebase(r: TraceRequest, t0_s: float, cap: int | None) -> TraceRequest:
    out = r.output_tokens if cap is None else min(r.output_tokens, cap)
    if t0_s == 0.0 and out == r.output_tokens:
        return r
    return TraceRequest(r.request_id, r.arrival_s - t0_s, r.prompt_tokens, out, r.prompt_text, r.metadata)


def _resolve(name_or_path: str | os.PathLike[str] | None, shared_dir: Path | None) -> tuple[str, Path]:
    if name_or_path is None or str(name_or_path) == "default":
        if not DEFAULT_TRACE_PATH.is_file():
            raise DataFormatError(f"the bundled default trace is missing at {DEFAULT_TRACE_PATH}; "
                                  f"regenerate it with tools/make_default_trace.py")
        return "default", DEFAULT_TRACE_PATH
    text = str(name_or_path)
    if text in NAMED_TRACES:
        root = shared_dir if shared_dir is not None else default_shared_dir()
        path = root / NAMED_TRACES[text]
        if not path.exists():
            why = "that folder does not exist" if not root.is_dir() else "the file is missing there"
            raise DataFormatError(f"named trace '{text}' is looked up at {path}, but {why}; point "
                                  f"${SHARED_DATA_ENV} (or shared_dir) at the shared data folder, or pass a path")
        return text, path
    path = Path(text).expanduser()
    prefix = _servegen_prefix(path)
    if prefix is not None:
        return prefix.name, path
    if path.exists():
        return path.name, path
    raise DataFormatError(f"trace '{text}' is neither a named trace ({', '.join(NAMED_TRACES)}, default) "
                          f"nor an existing path")


def _servegen_prefix(path: Path) -> Path | None:
    """``.../chunk-N`` for a ServeGen chunk prefix or one of its two files, else None."""
    m = re.fullmatch(r"(chunk-\d+)(-trace\.csv|-dataset\.json)?", path.name)
    if m is None:
        return None
    prefix = path.with_name(m.group(1))
    trace_csv = prefix.with_name(prefix.name + "-trace.csv")
    return prefix if trace_csv.is_file() else None


def _read_any(path: Path, *, seed: int, max_requests: int | None) -> tuple[list[TraceRequest], int | None]:
    from emulator import servegen  # late: servegen imports TraceRequest from here

    if path.is_dir() or _servegen_prefix(path) is not None:
        prefix = None if path.is_dir() else _servegen_prefix(path)
        reqs = servegen.sample_servegen(path if prefix is None else prefix, seed=seed,
                                        n_requests=max_requests or servegen.DEFAULT_SAMPLED_REQUESTS)
        return reqs, servegen.SERVEGEN_MAX_OUTPUT_TOKENS
    first = _first_line(path)
    if first.startswith("{"):
        try:
            keys = set(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            raise DataFormatError(f"{path}:1: not a JSON object; expected one of: {ACCEPTED_FORMATS}") from None
        if {"input_length", "output_length"} <= keys:
            return _read_mooncake(path), None
        if {"prompt", "output_tokens"} <= keys:
            return _read_lengths(path)
        if {"prompt", "response"} <= keys:
            return _read_pairs(path), None
        raise DataFormatError(f"{path}:1: JSONL record with fields {sorted(keys)} is no known trace; "
                              f"expected one of: {ACCEPTED_FORMATS}")
    header = [h.strip() for h in first.split(",")]
    if header[:3] == ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
        return _read_azure(path), None
    if header[:2] == ["num_prefill_tokens", "num_decode_tokens"]:
        return _read_vidur(path), None
    raise DataFormatError(f"{path}: cannot tell the trace format from its first line {first[:80]!r}; "
                          f"expected one of: {ACCEPTED_FORMATS}")


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({e.strerror})") from None
    raise DataFormatError(f"{path}: the file is empty; expected one of: {ACCEPTED_FORMATS}")


# --- field checks shared by the readers -------------------------------------------------------

def _count(value: object, key: str, where: str, minimum: int = 0) -> int:
    """An integer token count >= minimum from a JSON number or CSV string (``12`` or ``12.0``)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)  # type: ignore[arg-type]
        if not number.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise DataFormatError(f"{where}: field '{key}' = {value!r:.40} is not an integer token count") from None
    if number < minimum:
        raise DataFormatError(f"{where}: field '{key}' = {int(number)} must be >= {minimum}")
    return int(number)


def _output_tokens(value: object, key: str, where: str) -> int:
    # A served request always yields at least the token sampled after prefill, so a recorded 0
    # (a client cancel) replays as 1; negative counts are errors.
    return max(1, _count(value, key, where))


def _need(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj or obj[key] is None or obj[key] == "":
        raise DataFormatError(f"{where}: missing field '{key}' (has: {', '.join(sorted(obj)) or 'nothing'})")
    return obj[key]


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``"file:line"``, record) for each non-blank line."""
    for lineno, obj in iter_jsonl(path):
        yield f"{path}:{lineno}", obj


def _iter_csv(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(``"file:line"``, row) for each data row; line numbers count the header as line 1."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        start = 2
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if None in row:
                raise DataFormatError(f"{where}: more values than header columns ({len(reader.fieldnames or [])})")
            yield where, {k: (v or "").strip() for k, v in row.items()}


# --- readers ------------------------------------------------------------------------------------

def _read_lengths(path: Path) -> tuple[list[TraceRequest], int | None]:
    """lengths JSONL: requests at time 0 with prompt text; the trace's cap is the largest
    ``max_new_tokens`` its records carry (they were generated under it)."""
    out: list[TraceRequest] = []
    cap: int | None = None
    for i, (where, o) in enumerate(_iter_jsonl(path)):
        prompt = _need(o, "prompt", where)
        if not isinstance(prompt, str):
            raise DataFormatError(f"{where}: field 'prompt' must be text, got {type(prompt).__name__}")
        output = _output_tokens(_need(o, "output_tokens", where), "output_tokens", where)
        meta: dict[str, Any] = {}
        if o.get("max_new_tokens") is not None:
            rec_cap = _count(o["max_new_tokens"], "max_new_tokens", where, minimum=1)
            cap = rec_cap if cap is None else max(cap, rec_cap)
            meta["max_new_tokens"] = rec_cap
        for key in ("output_tokens_by_temperature", "reference_output_tokens"):
            if o.get(key) is not None:
                meta[key] = o[key]
        out.append(TraceRequest(str(o.get("id", f"{path.stem}-{i}")), 0.0, estimate_prompt_tokens(prompt),
                                output, prompt, meta))
    return out, cap


def _read_pairs(path: Path) -> list[TraceRequest]:
    """Conversation pairs JSONL (ShareGPT): requests at time 0; the reply's length in tokens
    is estimated from its characters by the prompt's rule (``estimate_prompt_tokens``)."""
    out: list[TraceRequest] = []
    for i, (where, o) in enumerate(_iter_jsonl(path)):
        prompt, response = o.get("prompt"), o.get("response")  # an empty turn is one token, not an error
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataFormatError(f"{where}: fields 'prompt' and 'response' must be text, got "
                                  f"{type(prompt).__name__} and {type(response).__name__}")
        out.append(TraceRequest(str(o.get("id", f"{path.stem}-{i}")), 0.0, estimate_prompt_tokens(prompt),
                                max(1, estimate_prompt_tokens(response)), prompt))
    return out


def _read_mooncake(path: Path) -> list[TraceRequest]:
    out = []
    for i, (where, o) in enumerate(_iter_jsonl(path)):
        ts_ms = _need(o, "timestamp", where)
        if isinstance(ts_ms, bool) or not isinstance(ts_ms, (int, float)) or ts_ms < 0:
            raise DataFormatError(f"{where}: field 'timestamp' = {ts_ms!r:.40} must be milliseconds >= 0")
        hashes = o.get("hash_ids", [])
        if not isinstance(hashes, list):
            raise DataFormatError(f"{where}: field 'hash_ids' must be a list of prefix-block ids")
        out.append(TraceRequest(f"{path.stem}-{i}", ts_ms / 1000.0,
                                _count(_need(o, "input_length", where), "input_length", where, minimum=1),
                                _output_tokens(_need(o, "output_length", where), "output_length", where),
                                None, {"hash_ids": tuple(hashes)}))
    return out


def _parse_azure_time(text: str, where: str) -> float:
    """Seconds since the epoch of ``2023-11-16 18:17:03.9799600`` (7 fraction digits, which
    ``datetime.fromisoformat`` rejects before Python 3.11, so the fraction is parsed apart)."""
    base, _, frac = text.partition(".")
    try:
        dt = datetime.strptime(base.replace("T", " "), "%Y-%m-%d %H:%M:%S")
        fraction_s = float("0." + frac) if frac else 0.0
    except ValueError:
        raise DataFormatError(f"{where}: field 'TIMESTAMP' = {text!r:.40} is not a datetime like "
                              f"'2023-11-16 18:17:03.9799600'") from None
    return dt.timestamp() + fraction_s


def _read_azure(path: Path) -> list[TraceRequest]:
    out = []
    for i, (where, row) in enumerate(_iter_csv(path)):
        t_s = _parse_azure_time(_need(row, "TIMESTAMP", where), where)
        out.append(TraceRequest(f"{path.stem}-{i}", t_s,
                                _count(_need(row, "ContextTokens", where), "ContextTokens", where, minimum=1),
                                _output_tokens(_need(row, "GeneratedTokens", where), "GeneratedTokens", where)))
    return out


def _read_vidur(path: Path) -> list[TraceRequest]:
    out = []
    for i, (where, row) in enumerate(_iter_csv(path)):
        out.append(TraceRequest(f"{path.stem}-{i}", 0.0,
                                _count(_need(row, "num_prefill_tokens", where), "num_prefill_tokens", where, 1),
                                _output_tokens(_need(row, "num_decode_tokens", where), "num_decode_tokens", where)))
    return out

