"""Readers for length-labelled request data and the deterministic train/calibration/test split.

Why a hash split: ``predictor train`` and ``predictor eval`` run in separate processes,
possibly on different machines, and must agree on which records were never trained or
calibrated on. Hashing the record id (not shuffling with a seed) makes the split a pure
function of the record, stable across file order, subsetting and Python versions.

Length units: ``lengths/*.jsonl`` carry generated *tokens* (Vicuna-7B); ShareGPT carries
only the reply text, so its unit is *characters* (``response_chars``) and its
``max_new_tokens`` cap is the fixed ``SHAREGPT_MAX_CHARS`` (the longest reply is 5,692
characters). A predictor is trained and evaluated in one unit; the manifest records which.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from odma_mlu.errors import DataFormatError
from odma_mlu.predictor.base import RequestFeatures

Split = Literal["train", "calib", "test"]

#: Percent of records (by id hash) in each split: 70 train, 15 calibration, 15 test.
TRAIN_PCT = 70
CALIB_PCT = 15
#: Length cap for ShareGPT, in characters (its unit); the data's maximum is 5,692.
SHAREGPT_MAX_CHARS = 6144
#: Text beyond this many characters is cut before anything else touches it (enormous prompts).
MAX_PROMPT_CHARS = 32_768


@dataclass(frozen=True)
class LengthRecord:
    """One request with its true generation length (in ``unit``)."""

    record_id: str
    prompt: str
    length: int
    max_new_tokens: int
    temperature: float = 0.0
    unit: str = "tokens"
    #: Extra samples of the same prompt's length at other temperatures: ((T, length), ...).
    other_temperatures: tuple[tuple[float, int], ...] = ()
    #: Length of a reference answer (Alpaca's GPT output), an auxiliary training target only.
    reference_length: int | None = None

    def features(self, with_text: bool = True) -> RequestFeatures:
        """Request as a policy would see it; ``prompt_tokens`` approximated as chars/4
        because the data carries no serving-model token count."""
        return RequestFeatures(prompt_tokens=max(1, len(self.prompt) // 4), max_new_tokens=self.max_new_tokens,
                               prompt_text=self.prompt if with_text else None, temperature=self.temperature)


def split_of(record_id: str) -> Split:
    """Deterministic split from a SHA-1 of the id (70/15/15)."""
    h = int.from_bytes(hashlib.sha1(record_id.encode("utf-8", "replace")).digest()[:4], "big") % 100
    if h < TRAIN_PCT:
        return "train"
    if h < TRAIN_PCT + CALIB_PCT:
        return "calib"
    return "test"


def clean_text(text: str) -> str:
    """Make any string safe for the tokenizer: lone surrogates and undecodable bytes become
    U+FFFD, and enormous prompts are cut to ``MAX_PROMPT_CHARS`` (never crash)."""
    if len(text) > MAX_PROMPT_CHARS:
        text = text[:MAX_PROMPT_CHARS]
    return text.encode("utf-8", "replace").decode("utf-8", "replace")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSON-lines file; a byte-order mark
    and undecodable bytes are tolerated, a line that is not one JSON object is an error
    naming the file and line."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _need(obj: dict, key: str, path: Path, lineno: int, kinds: tuple[type, ...]) -> object:
    if key not in obj:
        raise DataFormatError(f"{path}:{lineno}: missing field '{key}' (has: {', '.join(sorted(obj))})")
    v = obj[key]
    if not isinstance(v, kinds) or isinstance(v, bool):
        raise DataFormatError(f"{path}:{lineno}: field '{key}' must be {'/'.join(k.__name__ for k in kinds)}, "
                              f"got {v!r:.60}")
    return v


def _read_lengths(path: Path) -> list[LengthRecord]:
    out = []
    for lineno, o in iter_jsonl(path):
        prompt = str(_need(o, "prompt", path, lineno, (str,)))
        length = int(_need(o, "output_tokens", path, lineno, (int, float)))  # type: ignore[arg-type]
        max_new = int(_need(o, "max_new_tokens", path, lineno, (int, float)))  # type: ignore[arg-type]
        if max_new < 1 or length < 0:
            raise DataFormatError(f"{path}:{lineno}: output_tokens={length} and max_new_tokens={max_new} "
                                  f"must be >= 0 and >= 1")
        others = []
        for t, v in (o.get("output_tokens_by_temperature") or {}).items():
            try:
                if float(t) != 0.0:
                    others.append((float(t), int(v)))
            except (TypeError, ValueError):
                raise DataFormatError(f"{path}:{lineno}: output_tokens_by_temperature entry {t!r}: {v!r} "
                                      f"is not temperature -> int") from None
        ref = o.get("reference_output_tokens")
        out.append(LengthRecord(str(o.get("id", f"{path.name}:{lineno}")), clean_text(prompt), min(length, max_new),
                                max_new, 0.0, "tokens", tuple(others), int(ref) if isinstance(ref, (int, float)) else None))
    return out


def _read_sharegpt(path: Path) -> list[LengthRecord]:
    out = []
    for lineno, o in iter_jsonl(path):
        prompt = str(_need(o, "prompt", path, lineno, (str,)))
        if "response_chars" in o:
            chars = int(_need(o, "response_chars", path, lineno, (int, float)))  # type: ignore[arg-type]
        else:
            chars = len(str(_need(o, "response", path, lineno, (str,))))
        out.append(LengthRecord(str(o.get("id", f"{path.name}:{lineno}")), clean_text(prompt),
                                min(chars, SHAREGPT_MAX_CHARS), SHAREGPT_MAX_CHARS, 0.0, "chars"))
    return out


def read_alpaca_reference(path: Path) -> list[LengthRecord]:
    """Alpaca 52K as auxiliary data: prompt -> reference answer length in characters.
    Ids are ``alpaca-<index>`` so they share the lengths file's split (no test leakage)."""
    try:
        with open(path, "rb") as f:
            items = json.loads(f.read().decode("utf-8", "replace"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    out = []
    for i, o in enumerate(items):
        if not isinstance(o, dict) or "instruction" not in o or "output" not in o:
            raise DataFormatError(f"{path}: item {i} lacks 'instruction' or 'output'")
        prompt = o["instruction"] + (f"\n\n{o['input']}" if o.get("input") else "")
        out.append(LengthRecord(f"alpaca-{i}", clean_text(prompt), len(o["output"]), 4096, 0.0, "chars"))
    return out


def read_records(path: str | Path) -> list[LengthRecord]:
    """Read a ``lengths/*.jsonl`` or ``sharegpt/*.jsonl`` file (format sniffed from the first record)."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"{p}: no such data file (expected e.g. ../shared/data/lengths/"
                              f"alpaca_vicuna7b_train.jsonl)")
    first = next(iter_jsonl(p), None)
    if first is None:
        raise DataFormatError(f"{p}: the file holds no records")
    _, o = first
    if "response" in o or "response_chars" in o:
        return _read_sharegpt(p)
    return _read_lengths(p)


def select(records: list[LengthRecord], split: Split | Literal["all"]) -> list[LengthRecord]:
    return list(records) if split == "all" else [r for r in records if split_of(r.record_id) == split]
