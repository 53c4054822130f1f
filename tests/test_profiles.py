"""Device-profile schema: every error path names the file, the key and what was expected."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from emulator.profile import available_profiles, load_profile, parse_profile
from odma_mlu.errors import ProfileError

BUILTIN = ("mlu370-x4", "mlu370-x8", "mlu590", "h100-sxm", "cpu-host")


def good() -> dict[str, Any]:
    return {
        "name": "t", "memory_type": "LPDDR5", "capacity_bytes": "1 GiB", "peak_bandwidth": "100 GB/s",
        "sequential": [{"chunk_bytes": 64, "bandwidth": "90 GB/s", "source": "measured"},
                       {"chunk_bytes": 4096, "bandwidth": "90 GB/s", "source": "measured"}],
        "gather": [{"chunk_bytes": 64, "bandwidth": "30 GB/s", "source": "derived", "note": "a guess"},
                   {"chunk_bytes": 4096, "bandwidth": "85 GB/s", "source": "measured"}],
        "compute_flops_per_s": {"float16": "10 TFLOPS"}, "launch_overhead": "5 us",
        "provenance": {"kind": "measured", "tool": "t", "host": "h", "date": "2025-01-01"},
    }


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def expect_error(tmp_path: Path, data: dict[str, Any], *fragments: str) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    msg = str(info.value)
    assert str(path) in msg, f"message does not name the file: {msg}"
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


def test_good_profile_loads(tmp_path: Path) -> None:
    p = load_profile(str(write(tmp_path, good())))
    assert p.capacity_bytes == 1024**3
    assert p.peak_bandwidth_bytes_per_s == pytest.approx(100e9)
    assert p.launch_overhead_s == pytest.approx(5e-6)
    assert p.locality(64) == pytest.approx(30 / 90)
    assert p.locality(10**6) == pytest.approx(85 / 90)


def test_stream_bandwidth_is_the_longest_chunks(tmp_path: Path) -> None:
    """Weights stream at the sequential bandwidth of long chunks, not at the curve's best
    point: a CPU host reads short chunks from cache-friendly kernels faster (measured: 25.6
    GB/s at 128 B against 13.4 from 4 KiB on, which its matmuls also reach)."""
    data = good()
    data["sequential"] = [{"chunk_bytes": 64, "bandwidth": "95 GB/s", "source": "measured"},
                          {"chunk_bytes": 4096, "bandwidth": "40 GB/s", "source": "measured"}]
    p = load_profile(str(write(tmp_path, data)))
    assert p.stream_bandwidth_bytes_per_s == pytest.approx(40e9)


def test_decode_attention_values(tmp_path: Path) -> None:
    assert load_profile(str(write(tmp_path, {**good(), "decode_attention": "in_place"}))).decode_attention == "in_place"
    assert load_profile(str(write(tmp_path, good()))).decode_attention == "gather"
    expect_error(tmp_path, {**good(), "decode_attention": "paged"}, "decode_attention", "'paged'", "gather", "in_place")


def test_attention_call_overhead(tmp_path: Path) -> None:
    """An attention call's fixed cost: one launch where a profile has none, never under one."""
    assert load_profile(str(write(tmp_path, good()))).attention_call_s == pytest.approx(5e-6)
    p = load_profile(str(write(tmp_path, {**good(), "attention_call_overhead": "17.5 us"})))
    assert p.attention_call_s == pytest.approx(17.5e-6) and p.launch_overhead_s == pytest.approx(5e-6)
    expect_error(tmp_path, {**good(), "attention_call_overhead": "2 us"}, "attention_call_overhead", "launch_overhead")
    expect_error(tmp_path, {**good(), "attention_call_overhead": "many"}, "attention_call_overhead")


def test_missing_top_key(tmp_path: Path) -> None:
    d = good()
    del d["gather"]
    expect_error(tmp_path, d, "missing key(s) ['gather']", "a profile needs")


def test_missing_point_key(tmp_path: Path) -> None:
    d = good()
    del d["sequential"][1]["bandwidth"]
    expect_error(tmp_path, d, "sequential[1]", "missing key 'bandwidth'")


def test_negative_chunk_bytes(tmp_path: Path) -> None:
    d = good()
    d["gather"][0]["chunk_bytes"] = -64
    expect_error(tmp_path, d, "gather[0].chunk_bytes", "must be positive", "-64")


def test_non_monotone_granularity(tmp_path: Path) -> None:
    d = good()
    d["sequential"][1]["chunk_bytes"] = 32
    expect_error(tmp_path, d, "sequential[1].chunk_bytes", "increase strictly", "32 follows 64")


def test_equal_granularity_rejected(tmp_path: Path) -> None:
    d = good()
    d["gather"][1]["chunk_bytes"] = "64 B"
    expect_error(tmp_path, d, "gather[1].chunk_bytes", "increase strictly")


def test_unknown_unit(tmp_path: Path) -> None:
    d = good()
    d["peak_bandwidth"] = "100 GB/min"
    expect_error(tmp_path, d, "peak_bandwidth", "unknown unit 'GB/min'", "GB/s")


def test_unreadable_quantity(tmp_path: Path) -> None:
    d = good()
    d["launch_overhead"] = "fast"
    expect_error(tmp_path, d, "launch_overhead", "cannot read 'fast'")


def test_unknown_top_key(tmp_path: Path) -> None:
    d = good()
    d["bandwith"] = "1 GB/s"
    expect_error(tmp_path, d, "unknown key(s) ['bandwith']", "valid keys are")


def test_unknown_point_key(tmp_path: Path) -> None:
    d = good()
    d["gather"][0]["notes"] = "typo"
    expect_error(tmp_path, d, "gather[0]", "unknown key(s) ['notes']", "chunk_bytes")


def test_derived_point_without_note(tmp_path: Path) -> None:
    d = good()
    del d["gather"][0]["note"]
    expect_error(tmp_path, d, "gather[0].note", "derived point must say how it was derived")


def test_bad_point_source(tmp_path: Path) -> None:
    d = good()
    d["gather"][1]["source"] = "guessed"
    expect_error(tmp_path, d, "gather[1].source", "'guessed'", "measured", "derived")


def test_bandwidth_above_peak(tmp_path: Path) -> None:
    d = good()
    d["sequential"][0]["bandwidth"] = "200 GB/s"
    expect_error(tmp_path, d, "sequential[0].bandwidth", "exceeds peak_bandwidth")


def test_too_few_points(tmp_path: Path) -> None:
    d = good()
    d["sequential"] = d["sequential"][:1]
    expect_error(tmp_path, d, "'sequential'", "at least 2 points")


@pytest.mark.parametrize("prov, fragments", [
    ({"kind": "guessed"}, ("provenance", "'measured' or 'derived'")),
    ("measured", ("provenance", "must be a mapping")),
    ({"kind": "measured", "tool": "t"}, ("provenance of kind 'measured'", "missing ['host', 'date']")),
    ({"kind": "derived"}, ("provenance of kind 'derived'", "missing ['sources']")),
])
def test_bad_provenance(tmp_path: Path, prov: Any, fragments: tuple[str, ...]) -> None:
    d = good()
    d["provenance"] = prov
    expect_error(tmp_path, d, *fragments)


def test_unknown_dtype(tmp_path: Path) -> None:
    d = good()
    d["compute_flops_per_s"] = {"int8": "100 TFLOPS"}
    expect_error(tmp_path, d, "compute_flops_per_s", "'int8'", "float16")


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ProfileError, match=re.escape(str(path)) + ".*must be a YAML mapping"):
        load_profile(str(path))


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="invalid YAML"):
        load_profile(str(path))


def test_unknown_profile_name_lists_builtins() -> None:
    with pytest.raises(ProfileError, match="unknown device profile 'no-such-card'.*mlu370-x4"):
        load_profile("no-such-card")


def test_missing_file() -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("/nonexistent/dir/x.yaml")


def test_missing_flops_dtype_names_profile(tmp_path: Path) -> None:
    p = load_profile(str(write(tmp_path, good())))
    with pytest.raises(ProfileError, match="no compute peak for bfloat16.*float16"):
        p.flops_for("bfloat16")


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_profiles_load(name: str) -> None:
    assert name in available_profiles()
    p = load_profile(name)
    assert p.name == name
    assert p.capacity_bytes > 0 and p.launch_overhead_s >= 0
    for curve in (p.sequential, p.gather):
        xs = [pt.chunk_bytes for pt in curve.points]
        assert xs == sorted(xs) and xs[0] <= 64 and xs[-1] >= 4 * 1024**2
    kind = p.provenance["kind"]
    assert all(pt.source == kind for pt in p.sequential.points + p.gather.points)
    # locality is a fraction, non-decreasing in run length
    locs = [p.locality(2**k) for k in range(6, 23)]
    assert all(0 < x <= 1 for x in locs) and locs == sorted(locs)


def test_every_builtin_profile_in_dir_loads() -> None:
    for name in available_profiles():
        load_profile(name)


def test_derived_profiles_are_honest_about_sources() -> None:
    for name in ("mlu370-x4", "mlu370-x8", "mlu590", "h100-sxm"):
        p = load_profile(name)
        assert p.provenance["kind"] == "derived" and p.provenance["sources"]
        assert all(pt.note.strip() for pt in p.sequential.points + p.gather.points)
    x4 = load_profile("mlu370-x4")
    assert x4.capacity_bytes == 23308 * 1024**2
    assert x4.peak_bandwidth_bytes_per_s == pytest.approx(307.2e9)
    assert "bfloat16" not in x4.compute_flops_per_s  # MLU370 has no bf16


def test_parse_profile_does_not_mutate_input() -> None:
    d = good()
    before = copy.deepcopy(d)
    parse_profile(d, "<memory>")
    assert d == before
