"""Config files, flags and model folders: every bad value is one line naming the key, the
value and what is allowed; never a traceback, never a silent acceptance or a hang."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from odma_mlu.cli import main as cli_main
from odma_mlu.config import (CacheConfig, EngineConfig, OdmaConfig, SchedulerConfig, ServerConfig, from_mapping,
                             load_model_spec)
from odma_mlu.errors import ConfigError
from odma_mlu.server.settings import load_serve_file, settings_from_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cls,kw,message", [
    (OdmaConfig, {"safety_fraction": 1.5}, r"cache.odma.safety_fraction = 1.5 is out of range: allowed \[0, 1\)"),
    (OdmaConfig, {"target_coverage": 2}, r"cache.odma.target_coverage = 2 is out of range: allowed \(0, 1\]"),
    (OdmaConfig, {"num_buckets": 0}, r"cache.odma.num_buckets = 0 is out of range"),
    (OdmaConfig, {"growth_factor": 1.0}, r"growth_factor = 1.0 is out of range: allowed \(1, inf\)"),
    (OdmaConfig, {"histogram_window": "big"}, r"histogram_window = 'big' \(str\) must be an integer"),
    (OdmaConfig, {"elastic": "yes"}, r"cache.odma.elastic = 'yes' must be true or false"),
    (OdmaConfig, {"uncertainty_ratio": float("nan")}, r"uncertainty_ratio = nan must be a finite number"),
    (OdmaConfig, {"granule_tokens": 0}, r"cache.odma.granule_tokens = 0 is out of range: allowed \[1, 65536\]"),
    (CacheConfig, {"kv_capacity_tokens": 10}, r"cache.kv_capacity_tokens = 10 is out of range: allowed \[256, "),
    (CacheConfig, {"kv_capacity_tokens": 4096.5}, r"kv_capacity_tokens = 4096.5 \(float\) must be an integer"),
    (CacheConfig, {"page_size_tokens": 0}, r"cache.page_size_tokens = 0 is out of range"),
    (CacheConfig, {"page_size_tokens": True}, r"page_size_tokens = True \(bool\) must be an integer"),
    (CacheConfig, {"activation_reserve_fraction": -0.1}, r"activation_reserve_fraction = -0.1 is out of range"),
    (SchedulerConfig, {"max_num_seqs": 0}, r"scheduler.max_num_seqs = 0 is out of range"),
    (SchedulerConfig, {"max_new_tokens": -5}, r"scheduler.max_new_tokens = -5 is out of range"),
    (SchedulerConfig, {"max_num_batched_tokens": None}, r"max_num_batched_tokens = null is not allowed"),
    (EngineConfig, {"backend": "tpu"}, r"backend = 'tpu' is not one of \['auto', 'mlu'"),
    (EngineConfig, {"dtype": "int8"}, r"dtype = 'int8' is not one of"),
    (EngineConfig, {"model": ""}, r"model = '' must be a non-empty string"),
    (ServerConfig, {"memory_fraction": 0}, r"server.memory_fraction = 0 is out of range: allowed \(0, 1\]"),
    (ServerConfig, {"drain_timeout_s": -1}, r"server.drain_timeout_s = -1 is out of range"),
    (ServerConfig, {"body_read_timeout_s": 0}, r"server.body_read_timeout_s = 0 is out of range"),
    (ServerConfig, {"max_waiting_requests": 0}, r"server.max_waiting_requests = 0 is out of range"),
    (ServerConfig, {"reasoning_parser": "qwen3"}, r"reasoning_parser = 'qwen3' is not one of \['deepseek_r1'\]"),
    (ServerConfig, {"log_level": "loud"}, r"log_level = 'loud' is not one of"),
])
def test_config_values_are_checked(cls: type, kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls(**kw)


def test_defaults_and_shipped_files_are_valid() -> None:
    for cls in (OdmaConfig, CacheConfig, SchedulerConfig, EngineConfig, ServerConfig):
        cls()
    for f in (ROOT / "deploy" / "emulator-cpu.yaml", ROOT / "deploy" / "mlu370-x4" / "deepseek-r1-distill-qwen-7b.yaml"):
        load_serve_file(f)


def test_yaml_errors_name_the_nested_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("model: x\ncache:\n  odma:\n    safety_fraction: 1.5\n")
    with pytest.raises(ConfigError, match=r"cache.odma.safety_fraction = 1.5 is out of range"):
        load_serve_file(f)
    f.write_text("model: x\nscheduler:\n  max_num_seqs: 0\n")
    with pytest.raises(ConfigError, match=r"scheduler.max_num_seqs = 0"):
        load_serve_file(f)
    with pytest.raises(ConfigError, match="safety_fraction"):
        from_mapping(EngineConfig, {"cache": {"odma": {"safety_fraction": "lots"}}}, "x")


def test_model_folder_with_zero_layers(tmp_path: Path) -> None:
    cfg = {"hidden_size": 64, "num_hidden_layers": 0, "num_attention_heads": 4, "intermediate_size": 128,
           "vocab_size": 448}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"num_hidden_layers = 0 must be an integer >= 1"):
        load_model_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2, "num_key_value_heads": 3}))
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads"):
        load_model_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "two"}))
    with pytest.raises(ConfigError, match="num_hidden_layers = 'two'"):
        load_model_spec(str(tmp_path))


@pytest.mark.parametrize("argv,message", [
    (["bench", "--page-size", "0"], "argument --page-size: 0 is out of range"),
    (["bench", "--kv-gib", "nan"], "argument --kv-gib: nan is out of range"),
    (["bench", "--rate-scale", "nan"], "argument --rate-scale: nan is out of range"),
    (["bench", "--rate-scale", "-1"], "argument --rate-scale: -1 is out of range"),
    (["bench", "--max-num-seqs", "0"], "argument --max-num-seqs: 0 is out of range"),
    (["bench", "--max-requests", "ten"], "argument --max-requests: 'ten' is not an integer"),
    (["bench", "--json", "/nonexistent-odma-dir/y.json"], "folder '/nonexistent-odma-dir' does not exist"),
    (["serve", "--model", "x", "--port", "70000"], "argument --port: 70000 is out of range"),
    (["generate", "--model", "x", "--prompt", "p", "--temperature", "inf"], "argument --temperature: inf"),
])
def test_cli_values_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not Path("/nonexistent-odma-dir").exists()


def test_bench_reads_a_serve_file_and_flags_override_it(tmp_path: Path) -> None:
    from emulator.bench import bench_configs
    from odma_mlu.cli import build_parser

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: some/folder\nbackend: emulated\nserver: {served_model_name: m}\n"
                   "cache: {page_size_tokens: 8, swap_space_bytes: 0, odma: {granule_tokens: 4, chunk_tokens: 8}}\n"
                   "scheduler: {max_num_seqs: 64, max_num_batched_tokens: 2048, enable_chunked_prefill: false}\n")
    cache, sched = bench_configs(build_parser().parse_args(["bench", "--config", str(cfg)]))
    assert (cache.page_size_tokens, cache.swap_space_bytes) == (8, 0)
    assert (cache.odma.granule_tokens, cache.odma.chunk_tokens) == (4, 8)
    assert (sched.max_num_seqs, sched.max_num_batched_tokens, sched.enable_chunked_prefill) == (64, 2048, False)
    cache, sched = bench_configs(build_parser().parse_args(
        ["bench", "--config", str(cfg), "--page-size", "16", "--swap-space-gib", "1", "--max-num-seqs", "32",
         "--chunked-prefill"]))
    assert (cache.page_size_tokens, cache.swap_space_bytes, cache.odma.granule_tokens) == (16, 2**30, 4)
    assert (sched.max_num_seqs, sched.max_num_batched_tokens, sched.enable_chunked_prefill) == (32, 2048, True)
    cache, sched = bench_configs(build_parser().parse_args(["bench"]))
    assert (cache, sched) == (CacheConfig(), SchedulerConfig())


def test_bench_config_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: {odma: {granule: 4}}\n")
    assert cli_main(["bench", "--config", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['granule']" in err and "granule_tokens" in err and "Traceback" not in err, err
    assert cli_main(["bench", "--config", str(tmp_path / "none.yaml"), "--no-progress"]) == 2
    assert "none.yaml does not exist" in capsys.readouterr().err


def test_empty_api_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    ns = argparse.Namespace(config=None, model="m", backend=None, kv_policy=None, predictor=None, host="127.0.0.1",
                            port=8000, api_key="")
    with pytest.raises(ConfigError, match="--api-key is empty"):
        settings_from_args(ns)
    ns.api_key = None
    monkeypatch.setenv("ODMA_API_KEY", "  ")
    with pytest.raises(ConfigError, match=r"\$ODMA_API_KEY is empty"):
        settings_from_args(ns)
    monkeypatch.setenv("ODMA_API_KEY", "k3y")
    assert settings_from_args(ns).api_key == "k3y"


def test_nan_trace_timestamp_is_an_error_not_a_hang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": NaN, "input_length": 10, "output_length": 5}\n'
                     '{"timestamp": 5, "input_length": 10, "output_length": 5}\n')
    rc = cli_main(["bench", "--trace", str(trace), "--mode", "online", "--policies", "static", "--no-progress"])
    assert rc == 2
    assert "arrival time nan; timestamps must be finite" in capsys.readouterr().err


def test_no_progress_bar_spam_when_stderr_is_not_a_terminal() -> None:
    r = subprocess.run([sys.executable, "-m", "odma_mlu.cli", "bench", "--max-requests", "30", "--policies",
                        "static", "--predictor", "simple"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "it/s" not in r.stderr and "req/s" not in r.stderr, r.stderr[-500:]
