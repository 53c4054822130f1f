"""Trace readers: exact values on tiny files, every error path, and the real shared data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from emulator import servegen
from emulator.traces import DEFAULT_TRACE_PATH, NAMED_TRACES, Trace, default_shared_dir, load_trace
from odma_mlu.errors import DataFormatError

SHARED = default_shared_dir()
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder absent at {SHARED} "
                                                               f"(set ODMA_SHARED_DATA to run the real-file tests)")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- readers on tiny files ------------------------------------------------------------------------

def test_azure_csv_parses_datetimes_and_sorts(tmp_path: Path) -> None:
    p = write(tmp_path / "az.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                   "2023-11-16 18:17:04.5000000,100,7\n"
                                   "2023-11-16 18:17:03.2500000,4808,10\n"
                                   "2023-11-16 18:18:03.2500000,3,0\n")
    t = load_trace(str(p))
    assert t.name == "az.csv" and t.max_new_tokens is None
    assert [(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in t.requests] == [
        ("az-1", 0.0, 4808, 10), ("az-0", 1.25, 100, 7), ("az-2", 60.0, 3, 1)]  # 0 generated replays as 1
    assert t.requests[0].prompt_text is None


def test_mooncake_jsonl_keeps_hash_ids(tmp_path: Path) -> None:
    p = write(tmp_path / "mc.jsonl",
              '{"timestamp": 1000, "input_length": 1024, "output_length": 6, "hash_ids": [0, 1]}\n\n'
              '{"timestamp": 3500, "input_length": 513, "output_length": 40, "hash_ids": [0, 2]}\n')
    t = load_trace(str(p))
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in t.requests] == [(0.0, 1024, 6), (2.5, 513, 40)]
    assert t.requests[1].metadata["hash_ids"] == (0, 2)


def test_lengths_jsonl_estimates_prompt_tokens_and_takes_cap(tmp_path: Path) -> None:
    recs = [{"id": "a", "prompt": "x" * 41, "output_tokens": 600, "max_new_tokens": 512,
             "output_tokens_by_temperature": {"0.0": 600}, "reference_output_tokens": 12},
            {"id": "b", "prompt": "hi", "output_tokens": 3}]
    p = write(tmp_path / "len.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    t = load_trace(str(p))
    assert t.max_new_tokens == 512
    a, b = t.requests
    assert (a.request_id, a.arrival_s, a.prompt_tokens, a.output_tokens, a.prompt_text) == ("a", 0.0, 10, 512, "x" * 41)
    assert a.metadata == {"max_new_tokens": 512, "output_tokens_by_temperature": {"0.0": 600},
                          "reference_output_tokens": 12}
    assert (b.prompt_tokens, b.output_tokens) == (1, 3)  # max(1, 2 // 4)


def test_vidur_csv(tmp_path: Path) -> None:
    p = write(tmp_path / "v.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                                  "3772,54,3826,69.8\n2015,156,2171,12.9\n")
    t = load_trace(str(p))
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in t.requests] == [(0.0, 3772, 54), (0.0, 2015, 156)]


def test_caps_first_n_and_summary(tmp_path: Path) -> None:
    p = write(tmp_path / "mc.jsonl", "".join(
        json.dumps({"timestamp": 1000 * i, "input_length": 10 * (i + 1), "output_length": 100 * (i + 1),
                    "hash_ids": []}) + "\n" for i in range(5)))
    t = load_trace(str(p), max_requests=4, max_new_tokens=250)
    assert [r.output_tokens for r in t.requests] == [100, 200, 250, 250]
    assert t.max_new_tokens == 250
    assert t.summary() == {"name": "mc.jsonl", "count": 4, "output_tokens_mean": 200.0, "output_tokens_p50": 200,
                           "output_tokens_p99": 250, "output_tokens_max": 250, "prompt_tokens_mean": 25.0,
                           "duration_s": 3.0, "max_new_tokens": 250}


def test_caller_cap_never_loosens_the_traces_own(tmp_path: Path) -> None:
    p = write(tmp_path / "l.jsonl", '{"prompt": "p", "output_tokens": 5, "max_new_tokens": 8}\n')
    assert load_trace(str(p), max_new_tokens=100).max_new_tokens == 8
    assert load_trace(str(p), max_new_tokens=4).requests[0].output_tokens == 4


# --- ServeGen on a tiny folder --------------------------------------------------------------------

def make_servegen(folder: Path, rates: dict[int, float], output_pmf: str = "{100: 1.0}") -> Path:
    folder.mkdir(exist_ok=True)
    for n, rate in rates.items():
        write(folder / f"chunk-{n}-trace.csv", f"0,{rate},1.0,Gamma,1.0,1.0\n600,{rate},0.5,Weibull,2.0,1.0\n"
                                               f"1200,0,0,,0,0\n")
        write(folder / f"chunk-{n}-dataset.json", json.dumps(
            {"0": {"input_tokens": "{50: 0.5, 70: 0.5}", "output_tokens": output_pmf, "reason_ratio": "{0.25: 1.0}"},
             "21600": {"input_tokens": "{}", "output_tokens": "{}", "reason_ratio": "{}"}}, indent=2))
    return folder


def test_servegen_sampling_is_deterministic_and_mixes_by_rate(tmp_path: Path) -> None:
    folder = make_servegen(tmp_path / "sg", {1: 3.0, 2: 1.0})
    t = load_trace(str(folder), seed=7, max_requests=400)
    assert t == load_trace(str(folder), seed=7, max_requests=400)
    assert [r.arrival_s for r in t.requests] != [r.arrival_s for r in load_trace(str(folder), seed=8,
                                                                                 max_requests=400).requests]
    assert len(t.requests) == 400 and t.max_new_tokens == servegen.SERVEGEN_MAX_OUTPUT_TOKENS
    assert {r.output_tokens for r in t.requests} == {100} and {r.prompt_tokens for r in t.requests} == {50, 70}
    assert t.requests[0].metadata["reason_tokens"] == 25 and t.requests[0].metadata["reason_ratio"] == 0.25
    share = sum(r.metadata["client"] == "chunk-1" for r in t.requests) / 400
    assert 0.6 < share < 0.9  # 3:1 rates -> 0.75
    arrivals = [r.arrival_s for r in t.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    # 400 requests at 4 req/s take about 100 s
    assert 60 < arrivals[-1] < 140


def test_servegen_whole_trace_and_single_chunk(tmp_path: Path) -> None:
    folder = make_servegen(tmp_path / "sg", {3: 0.5}, output_pmf="{40000: 0.5, 10: 0.5}")
    t = load_trace(str(folder / "chunk-3"), seed=1, max_requests=10_000)
    assert 450 < len(t.requests) < 750  # 0.5 req/s over two 600 s windows: 600 expected
    assert {r.output_tokens for r in t.requests} == {10, 32768}
    assert load_trace(str(folder / "chunk-3-dataset.json"), seed=1, max_requests=50).requests == \
        load_trace(str(folder / "chunk-3"), seed=1, max_requests=50).requests
    assert load_trace(str(folder / "chunk-3-trace.csv"), seed=1, max_requests=50).name == "chunk-3"
    default = load_trace(str(folder / "chunk-3"), seed=1)
    assert len(default.requests) == min(len(t.requests), servegen.DEFAULT_SAMPLED_REQUESTS)


# --- error paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a", "output_tokens": 1}\n\n{"prompt": "b"}\n', "x.jsonl:3: missing field 'output_tokens'"),
    ('{"prompt": "a", "output_tokens": 1}\n{"prompt": "b", "output_tokens": "many"}\n',
     "x.jsonl:2: field 'output_tokens' = 'many' is not an integer token count"),
    ('{"prompt": "a", "output_tokens": 1}\n{"prompt": "b", "output_tokens": -2}\n',
     "x.jsonl:2: field 'output_tokens' = -2 must be >= 0"),
    ('{"prompt": "a", "output_tokens": 1}\n{"prompt": 5, "output_tokens": 2}\n', "x.jsonl:2: field 'prompt' must be text"),
    ('{"prompt": "a", "output_tokens": 1}\n{"prompt": "b", oops\n', "x.jsonl:2: not valid JSON"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": -1, "input_length": 5, '
     '"output_length": 1}\n', "x.jsonl:2: field 'timestamp' = -1 must be milliseconds >= 0"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 9, "output_length": 1}\n',
     "x.jsonl:2: missing field 'input_length'"),
    ('{"foo": 1}\n', "is no known trace; expected one of: Azure CSV"),
])
def test_jsonl_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path / "x.jsonl", text)
    with pytest.raises(DataFormatError) as e:
        load_trace(str(p))
    assert message in str(e.value)


@pytest.mark.parametrize("rows, message", [
    ("2023-11-16 18:17:03.1,10,5\n2023-11-16 18:17:04.1,10,abc\n", "x.csv:3: field 'GeneratedTokens' = 'abc'"),
    ("2023-11-16 18:17:03.1,10,5\nyesterday,10,5\n", "x.csv:3: field 'TIMESTAMP' = 'yesterday' is not a datetime"),
    ("2023-11-16 18:17:03.1,10,5\n2023-11-16 18:17:04.1,,5\n", "x.csv:3: missing field 'ContextTokens'"),
    ("2023-11-16 18:17:03.1,10,5,9\n", "x.csv:2: more values than header columns"),
])
def test_azure_errors_name_file_and_line(tmp_path: Path, rows: str, message: str) -> None:
    p = write(tmp_path / "x.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
    with pytest.raises(DataFormatError) as e:
        load_trace(str(p))
    assert message in str(e.value)


def test_unknown_format_lists_accepted_formats(tmp_path: Path) -> None:
    p = write(tmp_path / "x.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(DataFormatError) as e:
        load_trace(str(p))
    for fmt in ("Azure CSV", "Mooncake JSONL", "lengths JSONL", "Vidur CSV", "ServeGen"):
        assert fmt in str(e.value)
    with pytest.raises(DataFormatError, match="the file is empty"):
        load_trace(str(write(tmp_path / "empty.jsonl", "\n")))
    with pytest.raises(DataFormatError, match="no ServeGen chunk|chunk-N-trace.csv files; none found"):
        load_trace(str(tmp_path))


def test_missing_named_trace_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = tmp_path / "no" / "shared"
    with pytest.raises(DataFormatError) as e:
        load_trace("azure-code", shared_dir=nowhere)
    assert str(nowhere / "traces/azure_code_2023.csv") in str(e.value) and "does not exist" in str(e.value)
    monkeypatch.setenv("ODMA_SHARED_DATA", str(nowhere))
    with pytest.raises(DataFormatError, match="ODMA_SHARED_DATA"):
        load_trace("mooncake")
    with pytest.raises(DataFormatError, match="neither a named trace .*alpaca-vicuna.* nor an existing path"):
        load_trace(str(tmp_path / "missing.csv"))
    with pytest.raises(DataFormatError, match="max_requests=0"):
        load_trace(None, max_requests=0)


def test_servegen_errors_name_file_and_line(tmp_path: Path) -> None:
    folder = make_servegen(tmp_path / "sg", {0: 1.0})
    write(folder / "chunk-0-trace.csv", "0,1.0,1.0,Gamma,1,1\n600,fast,1.0,Gamma,1,1\n")
    with pytest.raises(DataFormatError, match=r"chunk-0-trace.csv:2: start_s, rate, cv and param1 must be numbers"):
        load_trace(str(folder))
    write(folder / "chunk-0-trace.csv", "0,1.0,1.0,Gamma,1,1\n600,1.0,1.0,Pareto,1,1\n")
    with pytest.raises(DataFormatError, match=r"chunk-0-trace.csv:2: unknown arrival pattern 'Pareto'"):
        load_trace(str(folder))
    write(folder / "chunk-0-trace.csv", "0,1.0,1.0,Gamma,1,1\n")
    ds = json.loads((folder / "chunk-0-dataset.json").read_text())
    ds["0"]["output_tokens"] = "{100: oops}"
    write(folder / "chunk-0-dataset.json", json.dumps(ds, indent=2))  # field on line 4
    with pytest.raises(DataFormatError, match=r"chunk-0-dataset.json:4: field 'output_tokens' of window '0' is not"):
        load_trace(str(folder))
    (folder / "chunk-0-dataset.json").unlink()
    with pytest.raises(DataFormatError, match="chunk-0-dataset.json is missing"):
        load_trace(str(folder))


# --- the bundled sample and the real shared files -------------------------------------------------

def test_default_sample_loads() -> None:
    assert DEFAULT_TRACE_PATH.stat().st_size < 1_000_000
    t = load_trace(None)
    assert t == load_trace("default")
    s = t.summary()
    assert (t.name, s["count"], t.max_new_tokens, s["output_tokens_max"]) == ("default", 1400, 512, 512)
    assert 90 <= s["output_tokens_p50"] <= 120
    assert all(r.prompt_text for r in t.requests) and s["duration_s"] == 0.0


@needs_shared
def test_default_sample_regenerates_identically(tmp_path: Path) -> None:
    sys.path.insert(0, str(DEFAULT_TRACE_PATH.parents[2] / "tools"))
    from make_default_trace import make_default_sample

    out = make_default_sample(out=tmp_path / "d.jsonl")
    assert out.read_bytes() == DEFAULT_TRACE_PATH.read_bytes()


@needs_shared
@pytest.mark.parametrize("name, count, p50, p99, cap", [
    ("alpaca-vicuna", 10_000, 105, 509, 512),
    ("azure-code", 8_819, 13, 252, None),
    ("mooncake", 3_993, 69, 769, None),
    ("vidur-arxiv", 28_257, 167, 3273, None),
])
def test_real_traces_match_the_data_readme(name: str, count: int, p50: int, p99: int, cap: int | None) -> None:
    t = load_trace(name)
    s = t.summary()
    assert (s["count"], s["output_tokens_p50"], s["output_tokens_p99"], t.max_new_tokens) == (count, p50, p99, cap)
    assert t.source == str(SHARED / NAMED_TRACES[name])
    if name == "azure-code":
        assert 3400 < s["duration_s"] < 3600 and round(s["prompt_tokens_mean"]) == 2048


@needs_shared
def test_servegen_r1_sampling() -> None:
    a: Trace = load_trace("servegen-r1", seed=3)
    b = load_trace("servegen-r1", seed=3)
    assert a == b and [r.metadata for r in a.requests] == [r.metadata for r in b.requests]
    s = a.summary()
    assert s["count"] == servegen.DEFAULT_SAMPLED_REQUESTS and a.max_new_tokens == 32768
    # The data README quotes p50 ~800 and p99 ~12,600; the request-volume-weighted mixture of
    # the published distributions gives p50 ~500 and p99 ~16,000, so the bounds are loose.
    assert 300 <= s["output_tokens_p50"] <= 1500
    assert 6_000 <= s["output_tokens_p99"] <= 25_000
    assert s["output_tokens_max"] <= 32768
    assert len({r.metadata["client"] for r in a.requests}) >= 5
