"""Length predictor: data readers, calibration, tiny end-to-end training, formats, registry.

Fast by design: training uses a few hundred synthetic records and a tiny encoder (seconds
on one CPU core). Tests on the real data read ../shared/data and skip when it is absent.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from odma_mlu.errors import DataFormatError
from odma_mlu.predictor.base import QUANTILES, RequestFeatures
from odma_mlu.predictor.calibration import Calibration, OnlineConformal
from odma_mlu.predictor.commands import TrainSpec, train_predictor
from odma_mlu.predictor.data import MAX_PROMPT_CHARS, LengthRecord, read_records, select, split_of
from odma_mlu.predictor.learned import FORMAT_VERSION, PredictorFormatError, load_learned, load_median, load_s3
from odma_mlu.predictor.metrics import evaluate
from odma_mlu.predictor.model import EncoderConfig
from odma_mlu.predictor.registry import DEFAULT_DIR, load_predictor
from odma_mlu.predictor.training import TrainConfig

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
LENGTHS = DATA / "lengths" / "alpaca_vicuna7b_train.jsonl"
SHAREGPT = DATA / "sharegpt" / "sharegpt_pairs_dev.jsonl"
needs_data = pytest.mark.skipif(not LENGTHS.is_file(), reason=f"shared data not found at {LENGTHS}")

TINY = TrainSpec(EncoderConfig(vocab_size=0, d_model=32, num_layers=1, num_heads=2, ff_dim=64, max_len=32,
                               tail_tokens=8),
                 TrainConfig(epochs=3, batch_size=32, lr=3e-3, seed=0, max_seconds=30),
                 TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=0, max_seconds=30),
                 vocab_size=300, use_alpaca_reference=False)


def _synthetic(n: int, seed: int = 0) -> list[LengthRecord]:
    """Prompt words decide the length scale: 'short' ~ 30 tokens, 'long' ~ 300."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        long = bool(rng.random() < 0.5)
        scale = 300 if long else 30
        y = int(np.clip(rng.lognormal(np.log(scale), 0.3), 1, 512))
        text = ("write a long detailed essay about " if long else "give a short answer about ") + f"topic {i % 17}"
        out.append(LengthRecord(f"syn-{i}", text, y, 512))
    return out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pred")
    train_predictor([], out, TINY, records=_synthetic(600))
    return out


def _write(path: Path, lines: list[str | bytes]) -> Path:
    with open(path, "wb") as f:
        for ln in lines:
            f.write((ln if isinstance(ln, bytes) else ln.encode()) + b"\n")
    return path


# ---- data readers -------------------------------------------------------------------------

def test_missing_field_reports_line_number(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.jsonl", ['{"id": "a", "prompt": "x", "output_tokens": 3, "max_new_tokens": 8}',
                                      '{"id": "b", "prompt": "y", "max_new_tokens": 8}'])
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: missing field 'output_tokens'"):
        read_records(p)


def test_bad_json_reports_line_number(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.jsonl", ['{"id": "a", "prompt": "x", "output_tokens": 3, "max_new_tokens": 8}',
                                      "", '{"id": oops}'])
    with pytest.raises(DataFormatError, match=r"d\.jsonl:3: not valid JSON"):
        read_records(p)


def test_non_utf8_empty_and_enormous_prompts(tmp_path: Path) -> None:
    huge = "word " * 100_000
    p = _write(tmp_path / "d.jsonl", [
        b'{"id": "a", "prompt": "caf\xe9 \xff\xfe", "output_tokens": 3, "max_new_tokens": 8}',
        '{"id": "b", "prompt": "", "output_tokens": 5, "max_new_tokens": 8}',
        json.dumps({"id": "c", "prompt": huge, "output_tokens": 9, "max_new_tokens": 8})])
    recs = read_records(p)
    assert "\ufffd" in recs[0].prompt and recs[1].prompt == ""
    assert len(recs[2].prompt) == MAX_PROMPT_CHARS and recs[2].length == 8  # capped at max_new_tokens


def test_sharegpt_reader_uses_characters(tmp_path: Path) -> None:
    p = _write(tmp_path / "s.jsonl", ['{"id": "x_1", "prompt": "hi", "response": "hello!"}'])
    (r,) = read_records(p)
    assert r.unit == "chars" and r.length == 6


def test_split_is_deterministic_and_proportioned() -> None:
    ids = [f"alpaca-{i}" for i in range(5000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "calib", "test")}
    assert abs(share["train"] - 0.70) < 0.03 and abs(share["test"] - 0.15) < 0.03


# ---- calibration --------------------------------------------------------------------------

def test_conformal_coverage_on_synthetic_data() -> None:
    rng = np.random.default_rng(0)
    mu_cal, mu_test = rng.uniform(3, 6, 2000), rng.uniform(3, 6, 50_000)
    y_cal = np.exp(mu_cal + rng.normal(0, 0.5, mu_cal.size))
    y_test = np.exp(mu_test + rng.normal(0, 0.5, mu_test.size))
    raw = lambda mu: np.exp(mu)[:, None] * np.array(QUANTILES)[None] * 1.5  # deliberately mis-scaled
    cal = Calibration.fit(QUANTILES, raw(mu_cal), None, y_cal, 0.9)
    cov = (y_test[:, None] <= cal.apply(raw(mu_test), True)).mean(axis=0)
    assert np.all(np.abs(cov - np.array(QUANTILES)) < 0.02), cov


def test_online_conformal_refits_after_shift() -> None:
    rng = np.random.default_rng(0)
    online = OnlineConformal(Calibration.identity(QUANTILES, 0.9), window=500, refit_every=100, min_samples=200)
    raw = np.array([100.0, 150, 200, 250, 300])
    for _ in range(600):  # truth is 2x longer than the raw predictions assume
        online.observe(raw, int(rng.lognormal(np.log(200), 0.3)), True)
    assert online.num_refits >= 1
    y = rng.lognormal(np.log(200), 0.3, 20000)
    assert abs((y <= online.calibration.apply(raw, True)[2]).mean() - 0.9) < 0.04


# ---- training, prediction, formats --------------------------------------------------------

def test_quantiles_monotone_and_in_range(tiny_folder: Path) -> None:
    pred = load_learned(tiny_folder)
    reqs = [RequestFeatures(10, 512, "write a long detailed essay about topic 3"),
            RequestFeatures(10, 512, "give a short answer about topic 3"), RequestFeatures(10, 64, ""),
            RequestFeatures(50, 512, None, temperature=0.7), RequestFeatures(10, 512, "x" * 200_000),
            RequestFeatures(10, 512, "bad \udcff surrogate")]
    for p in pred.predict_batch(reqs) + [pred.predict(reqs[0])]:
        assert list(p.tokens) == sorted(p.tokens) and 1 <= p.tokens[0] and p.tokens[-1] <= 512
        assert p.levels == QUANTILES
    long, short = pred.predict_batch(reqs[:2])
    assert long.median > 2 * short.median, "the text should matter"


def test_tiny_model_beats_median_and_covers(tiny_folder: Path) -> None:
    test = select(_synthetic(3000, seed=1), "test")
    ours, med, s3 = load_learned(tiny_folder), load_median(tiny_folder), load_s3(tiny_folder)
    m_ours, m_med = evaluate(ours, test, 0.9), evaluate(med, test, 0.9)
    evaluate(s3, test, 0.9)
    assert m_ours.mae < 0.5 * m_med.mae
    assert abs(m_ours.coverage - 0.9) < 0.06 and m_ours.mean_overreserve < m_med.mean_overreserve


def test_folder_contents_and_size(tiny_folder: Path) -> None:
    names = {p.name for p in tiny_folder.iterdir()}
    assert {"manifest.json", "model.safetensors", "tokenizer.json", "calibration.json", "s3.safetensors",
            "median.json"} <= names
    assert all(p.is_file() for p in tiny_folder.iterdir()), "flat folder (the package-data glob is not recursive)"


def test_version_mismatch_names_both_versions(tiny_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "old"
    bad.mkdir()
    for p in tiny_folder.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 41
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PredictorFormatError, match=rf"version {FORMAT_VERSION + 41}.*version {FORMAT_VERSION}"):
        load_learned(bad)
    with pytest.raises(PredictorFormatError, match="no manifest.json"):
        load_learned(tmp_path)


def test_registry(tiny_folder: Path) -> None:
    assert load_predictor(str(tiny_folder)).name == "learned"
    with pytest.raises(PredictorFormatError, match="neither a folder"):
        load_predictor(str(tiny_folder / "nope"))
    assert load_predictor(None).name == "auto" and load_predictor("auto").name == "auto"
    if (DEFAULT_DIR / "manifest.json").is_file():
        assert load_predictor("default").name == "learned"
        assert load_predictor("median").name == "median" and load_predictor("s3").name == "s3"


def test_registry_simple_is_lazy() -> None:
    pytest.importorskip("odma_mlu.predictor.simple", reason="the lead's SimplePredictor is not in this tree yet")
    assert load_predictor("simple").name == "simple"


def test_registry_missing_default_says_make_predictor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import odma_mlu.predictor.registry as reg

    monkeypatch.setattr(reg, "DEFAULT_DIR", tmp_path / "absent")
    with pytest.raises(PredictorFormatError, match="make predictor"):
        reg.load_predictor("default")
    auto = reg.load_predictor(None)  # the default still works: online lengths only
    assert auto.name == "auto" and auto.learned is None


@needs_data
def test_real_data_readers() -> None:
    recs = read_records(LENGTHS)
    assert len(recs) == 10_000 and all(r.unit == "tokens" and r.max_new_tokens == 512 for r in recs[:50])
    if SHAREGPT.is_file():
        assert read_records(SHAREGPT)[0].unit == "chars"


@needs_data
def test_bundled_default_on_real_test_split() -> None:
    if not (DEFAULT_DIR / "manifest.json").is_file():
        pytest.skip("no bundled default predictor: run `make predictor`")
    test = select(read_records(LENGTHS), "test")[:300]
    m = evaluate(load_predictor("default"), test, 0.9)
    assert m.mae < 70 and m.acc100 > 0.75


@pytest.mark.slow
@needs_data
def test_train_on_real_subset(tmp_path: Path) -> None:
    spec = replace(TINY, train=replace(TINY.train, epochs=4))
    train_predictor([LENGTHS], tmp_path, spec, records=read_records(LENGTHS)[:2000])
    assert load_learned(tmp_path).predict(RequestFeatures(10, 512, "Write a poem.")).median >= 1
