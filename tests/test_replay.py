"""Full-scale replay on small synthetic traces and the bundled default, and `odma-mlu bench --json`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from emulator.bench import resolve_predictor
from emulator.profile import PROFILE_DIR, DeviceProfile, load_profile
from emulator.replay import TIME_SPLIT, ReplayResult, kv_capacity_tokens, replay
from emulator.traces import Trace, TraceRequest, load_trace
from odma_mlu.cli import main as cli_main
from odma_mlu.config import CacheConfig, load_model_spec
from odma_mlu.kvcache.factory import POLICY_NAMES

MODEL = load_model_spec()
SMALL_PROFILE_YAML = """\
name: test-lpddr
memory_type: LPDDR5
capacity_bytes: 24 GiB
peak_bandwidth: 300 GB/s
sequential:
  - {chunk_bytes: 64, bandwidth: 200 GB/s, source: derived, note: unit-test curve}
  - {chunk_bytes: 1048576, bandwidth: 280 GB/s, source: derived, note: unit-test curve}
gather:
  - {chunk_bytes: 64, bandwidth: 40 GB/s, source: derived, note: unit-test curve}
  - {chunk_bytes: 1048576, bandwidth: 270 GB/s, source: derived, note: unit-test curve}
compute_flops_per_s: {float32: 24 TFLOPS, float16: 96 TFLOPS, bfloat16: 96 TFLOPS}
launch_overhead: 8 us
provenance: {kind: derived, sources: [tests/test_replay.py]}
"""
DEFAULT_PROFILE_EXISTS = (PROFILE_DIR / "mlu370-x4.yaml").is_file()
DESIGN_METRICS = ("kv_utilization", "kv_utilization_all", "reservation_efficiency", "tps", "rps", "overflow_rate",
                  "preemptions", "migrated_bytes", "lost", "completed", "makespan_s")
ONLINE_METRICS = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("profile") / "test-lpddr.yaml"
    p.write_text(SMALL_PROFILE_YAML)
    return p


@pytest.fixture(scope="module")
def profile(profile_path: Path) -> DeviceProfile:
    return load_profile(str(profile_path))


def synthetic_trace(n: int, max_new: int, seed: int = 0, spread_s: float = 0.0) -> Trace:
    rng = random.Random(seed)
    reqs = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(1.0) * spread_s
        reqs.append(TraceRequest(f"syn-{i}", t if spread_s else 0.0, rng.randint(4, 200),
                                 rng.choice([1, 2, rng.randint(1, max_new), rng.randint(1, max_new), max_new + 40])))
    return Trace(name="synthetic", source="tests", requests=tuple(reqs), max_new_tokens=max_new)


def run(trace: Trace, policy: str, profile: DeviceProfile, capacity: int, max_new: int, **kw: object) -> ReplayResult:
    predictor = resolve_predictor("simple") if policy in ("odma", "s3") else None
    return replay(trace, policy, MODEL, profile, max_new_tokens=max_new, capacity_tokens=capacity,
                  predictor=predictor, **kw)  # type: ignore[arg-type]


def check_result(r: ReplayResult, n: int) -> None:
    assert r.lost == 0, r
    assert r.rejected == 0
    assert r.completed == n
    assert r.extents_free_after
    assert r.makespan_s > 0 and r.tps > 0 and r.rps > 0
    assert 0 < r.kv_utilization <= 1 and 0 < r.kv_utilization_all <= 1
    assert 0 < r.reservation_efficiency <= 1
    assert 0 <= r.overflow_rate <= 1
    assert 1 <= r.max_concurrent <= n
    # held per running request: a mean over steps of held / running, never past the whole budget
    assert 0 < r.held_per_request_bytes <= r.capacity_tokens * MODEL.kv_bytes_per_token
    # the time split: parts of the steps' time, which is the makespan less idle waits
    split = r.time_split_s
    assert set(split) == set(TIME_SPLIT) and all(v >= 0 for v in split.values()), split
    assert split["busy_s"] == pytest.approx(sum(v for k, v in split.items() if k != "busy_s"), rel=1e-9)
    assert 0 < split["launch_s"] < split["busy_s"] <= r.makespan_s * (1 + 1e-12) and split["rest_s"] > 0


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_replay_small_capacity_forces_waiting_and_preemption(policy: str, profile: DeviceProfile) -> None:
    n, max_new, cap = 60, 256, 1200
    trace = synthetic_trace(n, max_new)
    r = run(trace, policy, profile, cap, max_new)
    check_result(r, n)
    # every output is clipped to max_new: generated tokens are exactly the clipped lengths
    assert r.generated_tokens == sum(max(1, min(q.output_tokens, max_new)) for q in trace.requests)
    assert r.capacity_tokens == cap
    assert max(r.timeline_live_tokens) <= cap and max(r.timeline_reserved_tokens) <= cap
    assert all(live <= res for live, res in zip(r.timeline_live_tokens, r.timeline_reserved_tokens))
    if policy in ("static", "oracle", "paged"):
        assert r.overflow_rate == 0
    if policy in ("static", "oracle"):
        assert r.preemptions == 0 and r.migrated_bytes == 0
        assert r.time_split_s["copy_s"] == r.time_split_s["swap_s"] == 0.0
    assert r.time_split_s["busy_s"] == pytest.approx(r.makespan_s, rel=1e-9)  # offline: never idle
    assert (r.time_split_s["copy_s"] > 0) == (r.migrated_bytes > 0)
    assert (r.time_split_s["swap_s"] > 0) == (r.num_swaps > 0)
    if policy == "paged":
        assert r.preemptions > 0  # grows page by page into a full arena
    if policy == "s3":
        assert r.overflow_rate > 0 and r.preemptions > 0  # prior-only predictions overflow and requeue
    if policy == "odma":
        assert r.bucket_edges_tokens and r.bucket_edges_tokens[-1] == max_new
    # mechanical: the same replay twice gives the same numbers (deterministic clock)
    r2 = run(trace, policy, profile, cap, max_new)
    assert r2.metrics() == r.metrics()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_replay_tiny_capacity_one_request_at_a_time(policy: str, profile: DeviceProfile) -> None:
    n, max_new = 15, 64
    trace = synthetic_trace(n, max_new, seed=3)
    cap = 200 + max_new + 16  # the biggest request just fits (odma: in its main region)
    if policy == "odma":
        cap = math.ceil(cap / 0.9) + 1
    r = run(trace, policy, profile, cap, max_new)
    check_result(r, n)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_replay_online_latency_percentiles(policy: str, profile: DeviceProfile) -> None:
    n, max_new = 40, 128
    trace = synthetic_trace(n, max_new, seed=1, spread_s=0.5)
    r = run(trace, policy, profile, 1500, max_new, mode="online", rate_scale=2.0)
    check_result(r, n)
    m = r.metrics()
    for k in ONLINE_METRICS:
        assert isinstance(m[k], float) and m[k] >= 0, k
    assert r.ttft_p99_s >= r.ttft_p50_s > 0
    assert r.tpot_p99_s >= r.tpot_p50_s > 0
    # the makespan covers at least the last arrival
    assert r.makespan_s >= trace.requests[-1].arrival_s / 2.0
    off = run(trace, policy, profile, 1500, max_new)
    assert off.ttft_p50_s is None and off.tpot_p50_s is None


def test_replay_counts_rejections_and_still_completes(profile: DeviceProfile) -> None:
    reqs = (TraceRequest("ok-0", 0.0, 10, 5), TraceRequest("too-long", 0.0, 5000, 5), TraceRequest("ok-1", 0.0, 20, 7))
    trace = Trace("t", "tests", reqs, 64)
    r = run(trace, "static", profile, 1000, 64)
    assert r.rejected == 1 and r.completed == 2 and r.lost == 0 and r.extents_free_after


def test_kv_capacity_from_profile(profile: DeviceProfile) -> None:
    cache = CacheConfig()
    usable = profile.capacity_bytes * (1 - cache.activation_reserve_fraction) - MODEL.weight_bytes
    assert kv_capacity_tokens(profile, MODEL, cache) == int(usable) // MODEL.kv_bytes_per_token
    assert kv_capacity_tokens(profile, MODEL, cache, kv_gib=1.0) == 1024**3 // MODEL.kv_bytes_per_token


@pytest.mark.skipif(not DEFAULT_PROFILE_EXISTS, reason="device_profiles/mlu370-x4.yaml not there yet")
def test_default_trace_all_policies_lose_nothing() -> None:
    trace = load_trace(None)
    profile = load_profile("mlu370-x4")
    cache = CacheConfig()
    cap = kv_capacity_tokens(profile, MODEL, cache)
    max_new = trace.max_new_tokens or 512
    n = len(trace.requests)
    for policy in POLICY_NAMES:
        r = run(trace, policy, profile, cap, max_new)
        assert r.lost == 0 and r.completed + r.rejected == n and r.extents_free_after, policy


def _check_bench_json(path: Path, policies: tuple[str, ...], profile_name: str, online: bool = False) -> None:
    doc = json.loads(path.read_text())
    for key in ("profile", "model", "trace", "results"):
        assert key in doc
    assert doc["profile"] == profile_name
    assert doc["model"] == MODEL.name
    assert doc["trace"] == "default"
    assert [row["policy"] for row in doc["results"]] == list(policies)
    for row in doc["results"]:
        for k in DESIGN_METRICS + (ONLINE_METRICS if online else ()):
            assert k in row, k
            assert row[k] is not None, k
        assert row["lost"] == 0 and row["completed"] == 50


def test_cli_bench_json_with_profile_path(tmp_path: Path, profile_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    rc = cli_main(["bench", "--max-requests", "50", "--predictor", "simple", "--json", str(out), "--no-progress",
                   "--profile", str(profile_path), "--plot", str(plot)])
    assert rc == 0
    _check_bench_json(out, POLICY_NAMES, "test-lpddr")
    text = capsys.readouterr().out
    assert "policy" in text and all(p in text for p in POLICY_NAMES)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # KV over time, throughput, time by part


@pytest.mark.skipif(not DEFAULT_PROFILE_EXISTS, reason="device_profiles/mlu370-x4.yaml not there yet")
def test_cli_bench_json_default_profile(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "--max-requests", "50", "--predictor", "simple", "--json", str(out), "--no-progress"])
    assert rc == 0
    _check_bench_json(out, POLICY_NAMES, "mlu370-x4")


def test_cli_bench_decode_attention_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--decode-attention in_place`` prices the what-if kernel: the same replay, never
    slower than the gathers the code issues, and the JSON says which was priced."""
    tps, gather_s = {}, {}
    for mode in ("gather", "in_place"):
        out = tmp_path / f"{mode}.json"
        assert cli_main(["bench", "--max-requests", "50", "--predictor", "simple", "--json", str(out), "--no-progress",
                         "--policies", "paged", "--decode-attention", mode]) == 0
        doc = json.loads(out.read_text())
        assert doc["decode_attention"] == mode
        tps[mode] = doc["results"][0]["tps"]
        gather_s[mode] = doc["results"][0]["time_split_s"]["gather_s"]
        text = capsys.readouterr().out
        assert f"decode attention {mode}" in text and "time by part" in text and "gather_s" in text
    assert tps["in_place"] > tps["gather"]
    assert gather_s["in_place"] == 0.0 < gather_s["gather"]  # paged's reads are gathered, unless priced in place
    assert cli_main(["bench", "--decode-attention", "paged", "--no-progress"]) == 2


def test_cli_bench_online_subset(tmp_path: Path, profile_path: Path) -> None:
    out = tmp_path / "online.json"
    rc = cli_main(["bench", "--max-requests", "50", "--predictor", "simple", "--json", str(out), "--no-progress",
                   "--profile", str(profile_path), "--policies", "odma,paged", "--mode", "online",
                   "--rate-scale", "4", "--kv-gib", "0.05"])
    assert rc == 0
    _check_bench_json(out, ("odma", "paged"), "test-lpddr", online=True)


def test_cli_bench_bad_arguments(tmp_path: Path, profile_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["bench", "--policies", "static,nope", "--profile", str(profile_path), "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli_main(["bench", "--max-requests", "0", "--profile", str(profile_path), "--no-progress"]) == 2
    assert cli_main(["bench", "--kv-gib", "-1", "--max-requests", "5", "--profile", str(profile_path),
                     "--no-progress"]) == 2


def test_backlog_tps_counts_only_steps_that_left_a_request_waiting(profile: DeviceProfile) -> None:
    """At a capacity that makes requests wait, ``backlog_tps`` is the throughput of the
    steps scheduled with a queue, and it beats the makespan's figure, whose tail decodes the
    last requests in small batches; with room for everyone at once, no step leaves a request
    waiting and there is no backlog figure."""
    n, max_new = 60, 256
    trace = synthetic_trace(n, max_new)
    tight = run(trace, "paged", profile, 1200, max_new)
    assert tight.backlog_tps is not None and tight.backlog_tps > tight.tps
    roomy = run(trace, "paged", profile, 100_000, max_new)
    assert roomy.backlog_tps is None
    assert roomy.metrics()["backlog_tps"] is None
