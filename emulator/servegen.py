"""ServeGen sampler: synthesize requests from ServeGen's per-client workload statistics.

ServeGen (Alibaba Cloud, Apache-2.0) publishes no request log, only per client ("chunk-N"):
- ``chunk-N-trace.csv``: one row per 10-minute window, ``start_s,rate,cv,pattern,p1,p2`` with
  the arrival rate (requests/s), the coefficient of variation of inter-arrival gaps, and the
  fitted gap distribution (``Gamma`` shape/scale, ``Weibull`` shape/scale, or empty = idle);
- ``chunk-N-dataset.json``: per 6-hour window (key = start second) the probability mass
  functions of ``input_tokens``, ``output_tokens`` and ``reason_ratio``, each a dict-literal
  string ``"{value: probability, ...}"``.

Why sample rather than read: that is the only form the data exists in, and it is the one
trace here with DeepSeek-R1's heavy, bimodal reasoning lengths (p50 ~800, p99 ~12,600) that
make a fixed reservation either wasteful or overflowing.

How (deterministic for a seed):
1. Arrivals: each client's windows, in time order from the trace start, are a renewal
   process whose gaps have the window's mean ``1/rate`` and the window's burstiness: Gamma
   gaps with shape ``1/cv**2`` (the fitted scale is not used, so the rate is honoured
   exactly in expectation), or Weibull gaps with the fitted shape and the scale that gives
   mean ``1/rate``. The process restarts in each window with its first arrival at
   ``U * gap`` (an approximation of a stationary start). Clients are superposed, so they mix
   by their request rates. Generation stops after the first window by which ``n_requests``
   arrivals exist; the first ``n_requests`` are kept (fewer if the whole trace has fewer).
2. Lengths: each request draws input tokens, output tokens and reason ratio independently
   (as ServeGen does) from its client's dataset window containing its arrival time (the
   latest window starting at or before it; the earliest if none does). Output is capped at
   ``SERVEGEN_MAX_OUTPUT_TOKENS``.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emulator.traces import ACCEPTED_FORMATS, TraceRequest
from odma_mlu.errors import DataFormatError

#: Requests sampled when the caller gives no count: enough for stable p99s, quick to replay.
DEFAULT_SAMPLED_REQUESTS = 1000
#: DeepSeek-R1's generation cap in the ServeGen data (its longest output).
SERVEGEN_MAX_OUTPUT_TOKENS = 32768
_PATTERNS = ("", "Gamma", "Weibull", "Exponential")
_FIELDS = ("input_tokens", "output_tokens", "reason_ratio")


@dataclass(frozen=True)
class ArrivalWindow:
    """One trace.csv row: arrivals in [start_s, start_s + length_s)."""

    start_s: float
    length_s: float
    rate_per_s: float
    cv: float
    pattern: str
    shape: float


@dataclass(frozen=True)
class LengthPmf:
    """A probability mass function over token counts (or ratios)."""

    values: np.ndarray
    probs: np.ndarray

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        idx = np.searchsorted(np.cumsum(self.probs), rng.random(n) * self.probs.sum(), side="right")
        return self.values[np.minimum(idx, len(self.values) - 1)]


class _Client:
    """One chunk: arrival windows eagerly, length distributions parsed on first use (the
    dict literals are megabytes and a short sample touches few 6-hour windows)."""

    def __init__(self, prefix: Path) -> None:
        self.name = prefix.name
        self.trace_path = prefix.with_name(prefix.name + "-trace.csv")
        self.dataset_path = prefix.with_name(prefix.name + "-dataset.json")
        if not self.dataset_path.is_file():
            raise DataFormatError(f"{self.trace_path}: its distributions file {self.dataset_path.name} is missing "
                                  f"beside it; a ServeGen client needs both")
        self.windows = _read_windows(self.trace_path)
        self._raw, self._lines = _read_dataset_json(self.dataset_path)
        self.dataset_starts_s = sorted(self._raw)
        self._pmfs: dict[int, dict[str, LengthPmf]] = {}

    def pmfs_at(self, t_s: float) -> tuple[int, dict[str, LengthPmf]]:
        usable = [s for s in self.dataset_starts_s if s <= t_s] or self.dataset_starts_s[:1]
        start = usable[-1]
        if start not in self._pmfs:
            self._pmfs[start] = {f: self._parse_pmf(start, f) for f in _FIELDS}
        return start, self._pmfs[start]

    def _parse_pmf(self, window: int, field_name: str) -> LengthPmf:
        line = self._lines.get((window, field_name))
        where = f"{self.dataset_path}:{line}" if line else f"{self.dataset_path} (window {window})"
        fields = self._raw[window]
        if field_name not in fields:
            raise DataFormatError(f"{where}: window '{window}' misses field '{field_name}' "
                                  f"(has: {', '.join(sorted(fields))})")
        text = fields[field_name]
        try:
            pmf = ast.literal_eval(text) if isinstance(text, str) else text
            if not isinstance(pmf, dict) or not pmf:
                raise ValueError("not a non-empty {value: probability} dict")
            values = np.array([float(v) for v in pmf.keys()])
            probs = np.array([float(p) for p in pmf.values()])
        except (ValueError, SyntaxError, TypeError) as e:
            raise DataFormatError(f"{where}: field '{field_name}' of window '{window}' is not a dict literal "
                                  f"{{value: probability}} ({e})") from None
        if (probs < 0).any() or not probs.sum() > 0 or not np.isfinite(values).all():
            raise DataFormatError(f"{where}: field '{field_name}' of window '{window}' needs finite values and "
                                  f"non-negative probabilities with a positive sum")
        order = np.argsort(values, kind="stable")
        return LengthPmf(values[order], probs[order])


def _read_windows(path: Path) -> tuple[ArrivalWindow, ...]:
    rows: list[tuple[float, float, float, str, float]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            where = f"{path}:{lineno}"
            if len(row) != 6:
                raise DataFormatError(f"{where}: expected 6 values start_s,rate,cv,pattern,param1,param2; "
                                      f"got {len(row)}")
            try:
                start_s, rate, cv, p1 = float(row[0]), float(row[1]), float(row[2]), float(row[4] or 0)
            except ValueError:
                raise DataFormatError(f"{where}: start_s, rate, cv and param1 must be numbers, got {row}") from None
            pattern = row[3].strip()
            if pattern not in _PATTERNS:
                raise DataFormatError(f"{where}: unknown arrival pattern {pattern!r}; expected one of "
                                      f"{[p for p in _PATTERNS if p]} or empty (idle window)")
            if not (rate >= 0 and cv >= 0 and math.isfinite(rate) and math.isfinite(cv)):
                raise DataFormatError(f"{where}: rate={row[1]} and cv={row[2]} must be finite and >= 0")
            if rows and start_s <= rows[-1][0]:
                raise DataFormatError(f"{where}: start_s={start_s:g} does not follow {rows[-1][0]:g}; "
                                      f"windows must be in increasing time order")
            rows.append((start_s, rate, cv, pattern, p1))
    if not rows:
        raise DataFormatError(f"{path}: no windows; expected rows start_s,rate,cv,pattern,param1,param2")
    step_s = rows[1][0] - rows[0][0] if len(rows) > 1 else 600.0
    ends = [r[0] for r in rows[1:]] + [rows[-1][0] + step_s]
    return tuple(ArrivalWindow(s, e - s, rate, cv, pat, p1) for (s, rate, cv, pat, p1), e in zip(rows, ends))


def _read_dataset_json(path: Path) -> tuple[dict[int, dict[str, Any]], dict[tuple[int, str], int]]:
    """Raw ``{window_start_s: {field: dict-literal}}`` without empty windows (ServeGen skips
    them too), and the line of each (window, field) for error messages."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    lines: dict[tuple[int, str], int] = {}
    window: int | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = re.match(r'\s*"([^"]+)"\s*:\s*(\{|")', line)
        if m and m.group(2) == "{" and m.group(1).lstrip("-").isdigit():
            window = int(m.group(1))
        elif m and window is not None:
            lines[(window, m.group(1))] = lineno
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}:1: expected an object {{window_start_s: {{field: pmf}}}}")
    out: dict[int, dict[str, Any]] = {}
    for key, fields in data.items():
        try:
            start = int(key)
        except ValueError:
            raise DataFormatError(f"{path}: window key {key!r} is not a start second") from None
        if not isinstance(fields, dict):
            raise DataFormatError(f"{path}: window '{key}' must map {list(_FIELDS)} to distributions")
        if any(isinstance(v, str) and v.strip() in ("{}", "") for v in fields.values()):
            continue
        out[start] = fields
    if not out:
        raise DataFormatError(f"{path}: no window with non-empty distributions of {list(_FIELDS)}")
    return out, lines


def load_clients(path: Path) -> list[_Client]:
    """A ServeGen folder (every ``chunk-N``, in N order) or one ``.../chunk-N`` prefix."""
    if path.is_dir():
        found = sorted((int(m.group(1)), p) for p in path.glob("chunk-*-trace.csv")
                       if (m := re.fullmatch(r"chunk-(\d+)-trace\.csv", p.name)))
        if not found:
            raise DataFormatError(f"{path}: a folder trace must hold ServeGen chunk-N-trace.csv files; "
                                  f"none found. Accepted formats: {ACCEPTED_FORMATS}")
        return [_Client(p.with_name(f"chunk-{n}")) for n, p in found]
    return [_Client(path)]


def _gap_sampler(w: ArrivalWindow, rng: np.random.Generator) -> Callable[[int], np.ndarray]:
    mean_gap_s = 1.0 / w.rate_per_s
    if w.pattern == "Weibull" and w.shape > 0:
        scale_s = mean_gap_s / math.gamma(1.0 + 1.0 / w.shape)
        return lambda n: scale_s * rng.weibull(w.shape, n)
    if w.cv <= 0:
        return lambda n: np.full(n, mean_gap_s)
    shape = 1.0 / (w.cv * w.cv)
    return lambda n: rng.gamma(shape, mean_gap_s / shape, n)


def _window_arrivals(w: ArrivalWindow, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of one window's renewal process."""
    gaps = _gap_sampler(w, rng)
    end_s = w.start_s + w.length_s
    pos_s = w.start_s + rng.random() * float(gaps(1)[0])
    batch = int(w.rate_per_s * w.length_s * 1.5) + 16
    chunks = []
    while pos_s < end_s:
        g = gaps(batch)
        times = pos_s + np.concatenate(([0.0], np.cumsum(g[:-1])))
        inside = times[times < end_s]
        chunks.append(inside)
        if len(inside) < len(times):
            break
        pos_s = float(times[-1] + g[-1])
    return np.concatenate(chunks) if chunks else np.empty(0)


def sample_servegen(path: Path, *, seed: int, n_requests: int = DEFAULT_SAMPLED_REQUESTS) -> list[TraceRequest]:
    """The first ``n_requests`` requests of a synthesized replay of ``path`` (a ServeGen
    folder or one ``chunk-N`` prefix), sorted by arrival; arrival times are seconds from the
    trace's start (``load_trace`` rebases them to the first request)."""
    clients = load_clients(path)
    arrival_ss, length_ss = np.random.SeedSequence(seed).spawn(2)
    arrival_rng, length_rng = np.random.default_rng(arrival_ss), np.random.default_rng(length_ss)
    starts_s = sorted({w.start_s for c in clients for w in c.windows})
    by_start = [{w.start_s: w for w in c.windows} for c in clients]
    times: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    total = 0
    for start_s in starts_s:
        for ci, windows in enumerate(by_start):
            w = windows.get(start_s)
            if w is None or w.rate_per_s <= 0:
                continue
            t = _window_arrivals(w, arrival_rng)
            times.append(t)
            owners.append(np.full(len(t), ci))
            total += len(t)
        if total >= n_requests:
            break
    if total == 0:
        raise DataFormatError(f"{path}: every window has rate 0; there are no arrivals to sample")
    all_t = np.concatenate(times)
    all_c = np.concatenate(owners)
    order = np.argsort(all_t, kind="stable")[:n_requests]
    all_t, all_c = all_t[order], all_c[order]

    n = len(all_t)
    inputs = np.zeros(n, dtype=np.int64)
    outputs = np.zeros(n, dtype=np.int64)
    ratios = np.zeros(n)
    windows_of = np.zeros(n, dtype=np.int64)
    for ci, client in enumerate(clients):  # fixed order keeps the length draws deterministic
        idx = np.flatnonzero(all_c == ci)
        groups: dict[int, list[int]] = {}
        for i in idx:
            groups.setdefault(client.pmfs_at(float(all_t[i]))[0], []).append(int(i))
        for window_start, members in sorted(groups.items()):
            pmfs = client.pmfs_at(window_start)[1]
            sel = np.array(members)
            inputs[sel] = pmfs["input_tokens"].sample(length_rng, len(sel))
            outputs[sel] = pmfs["output_tokens"].sample(length_rng, len(sel))
            ratios[sel] = pmfs["reason_ratio"].sample(length_rng, len(sel))
            windows_of[sel] = window_start
    inputs = np.maximum(inputs, 1)
    outputs = np.clip(outputs, 1, SERVEGEN_MAX_OUTPUT_TOKENS)

    per_client_count: dict[int, int] = {}
    out: list[TraceRequest] = []
    for i in range(n):
        ci = int(all_c[i])
        k = per_client_count.get(ci, 0)
        per_client_count[ci] = k + 1
        ratio = float(ratios[i])
        out.append(TraceRequest(
            f"{clients[ci].name}-{k}", float(all_t[i]), int(inputs[i]), int(outputs[i]), None,
            {"client": clients[ci].name, "reason_ratio": ratio,
             "reason_tokens": int(round(ratio * int(outputs[i]))), "dataset_window_s": int(windows_of[i])}))
    return out
