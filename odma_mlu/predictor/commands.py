"""``odma-mlu predictor train`` and ``odma-mlu predictor eval``.

train: read the data, split by id hash (70 train / 15 calibration / 15 test; a tenth of
train held out for early stopping), train the BPE tokenizer, the quantile encoder and the
S3 classifier, conformally calibrate all three predictors (ours, S3, global median) on the
calibration split to the same ``target_coverage``, save the folder, and report held-out
metrics. eval: the same metrics for the three predictors side by side on a split.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from odma_mlu.errors import DataFormatError
from odma_mlu.predictor.base import QUANTILES, RequestFeatures
from odma_mlu.predictor.calibration import Calibration
from odma_mlu.predictor.data import LengthRecord, read_alpaca_reference, read_records, select, split_of
from odma_mlu.predictor.learned import (LearnedPredictor, MedianPredictor, S3Predictor, _EncoderPredictor,
                                        load_learned, load_median, load_s3, save_encoder, write_manifest)
from odma_mlu.predictor.metrics import PredictorMetrics, evaluate, format_table
from odma_mlu.predictor.model import EncoderConfig
from odma_mlu.predictor.tokenizer import PromptEncoder, train_tokenizer
from odma_mlu.predictor.training import NUM_S3_BUCKETS, TrainConfig, fit, is_validation

DEFAULT_TARGET_COVERAGE = 0.9


@dataclass(frozen=True)
class TrainSpec:
    """Everything that decides a trained predictor (tests shrink it)."""

    encoder: EncoderConfig
    train: TrainConfig
    s3_train: TrainConfig
    vocab_size: int = 8000
    target_coverage: float = DEFAULT_TARGET_COVERAGE
    use_alpaca_reference: bool = True


def default_spec(seed: int = 0, max_minutes: float = 10.0) -> TrainSpec:
    # Leave a fifth of the budget for tokenizer training, encoding and calibration.
    budget_s = max_minutes * 60.0 * 0.8
    return TrainSpec(EncoderConfig(vocab_size=0), TrainConfig(epochs=8, seed=seed, max_seconds=budget_s * 0.55),
                     TrainConfig(epochs=8, seed=seed, max_seconds=budget_s * 0.45))


def _set_threads() -> None:
    # One thread: on the shared 2-core dev machine, 2 threads contending with another job
    # measured 116 s per epoch against 17 s with one (oversubscription), and the model is too
    # small for intra-op parallelism to pay off. Override with ODMA_PREDICTOR_THREADS (<= 2).
    torch.set_num_threads(max(1, min(2, int(os.environ.get("ODMA_PREDICTOR_THREADS", "1")))))


def _raw(pred: _EncoderPredictor | MedianPredictor, recs: Sequence[LengthRecord], with_text: bool) -> np.ndarray:
    feats = [r.features(with_text) for r in recs]
    return np.concatenate([pred.raw_quantiles(feats[s:s + 256]) for s in range(0, len(feats), 256)])


def _calibrate(pred: _EncoderPredictor | MedianPredictor, calib: Sequence[LengthRecord],
               target: float) -> Calibration:
    y = np.array([r.length for r in calib], dtype=np.float64)
    return Calibration.fit(QUANTILES, _raw(pred, calib, True), _raw(pred, calib, False), y, target)


def _find_alpaca_reference(data_paths: Sequence[Path]) -> Path | None:
    for p in data_paths:
        cand = p.resolve().parent.parent / "alpaca" / "alpaca_data.json"
        if cand.is_file():
            return cand
    return None


def train_predictor(data_paths: Sequence[str | Path], out: str | Path, spec: TrainSpec,
                    records: list[LengthRecord] | None = None) -> dict:
    """Train, calibrate and save all three predictors; returns the manifest's summary."""
    _set_threads()
    t0 = time.monotonic()
    paths = [Path(p) for p in data_paths]
    recs = records if records is not None else [r for p in paths for r in read_records(p)]
    units = {r.unit for r in recs}
    if len(units) != 1:
        raise DataFormatError(f"training files mix length units {sorted(units)}; train one predictor per unit")
    unit = units.pop()
    train_all, calib = select(recs, "train"), select(recs, "calib")
    train = [r for r in train_all if not is_validation(r.record_id)]
    val = [r for r in train_all if is_validation(r.record_id)] or train[:1]
    if len(train) < 20 or len(calib) < 10:
        raise DataFormatError(f"too few records to train ({len(train)} train, {len(calib)} calibration after the "
                              f"70/15/15 id-hash split); give at least ~100 records")
    aux: list[LengthRecord] = []
    ref = _find_alpaca_reference(paths) if spec.use_alpaca_reference and unit == "tokens" else None
    if ref is not None:
        aux = [r for r in read_alpaca_reference(ref) if split_of(r.record_id) == "train"]
    print(f"data: {len(train)} train, {len(val)} val, {len(calib)} calibration records ({unit}); "
          f"auxiliary Alpaca reference prompts: {len(aux)}", flush=True)
    tok = train_tokenizer([r.prompt for r in train_all] + [r.prompt for r in aux], spec.vocab_size)
    enc = PromptEncoder(tok, spec.encoder.max_len, spec.encoder.tail_tokens)
    cfg = replace(spec.encoder, vocab_size=enc.vocab_size)
    model, res = fit(replace(cfg, head="quantile", num_outputs=len(QUANTILES)), enc, train, val, aux, spec.train)
    s3_model, s3_res = fit(replace(cfg, head="classes", num_outputs=NUM_S3_BUCKETS), enc, train, val, aux,
                           spec.s3_train)
    target = spec.target_coverage
    ours = LearnedPredictor(model, enc, Calibration.identity(QUANTILES, target), unit)
    ours.calibration = _calibrate(ours, calib, target)
    s3 = S3Predictor(s3_model, enc, Calibration.identity(QUANTILES, target), unit)
    s3.calibration = _calibrate(s3, calib, target)
    fr = np.array([r.length / r.max_new_tokens for r in train_all])
    median = MedianPredictor(np.quantile(fr, QUANTILES), Calibration.identity(QUANTILES, target), unit)
    median.calibration = _calibrate(median, calib, target)

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_encoder(folder, "model", model, ours.calibration)
    save_encoder(folder, "s3", s3_model, s3.calibration)
    (folder / "median.json").write_text(json.dumps(median.to_dict(), indent=1), encoding="utf-8")
    enc.save(folder / "tokenizer.json")
    test = select(recs, "test")
    table = [evaluate(p, test, target) for p in (median, s3, ours)] if test else []
    seconds = time.monotonic() - t0
    summary = {
        "unit": unit, "target_coverage": target, "quantiles": list(QUANTILES),
        "encoder": cfg.to_dict(), "data": [str(p) for p in paths], "auxiliary_data": str(ref) if ref else None,
        "split": "sha1(id) % 100: <70 train (md5 1/10 of it validation), <85 calibration, else test",
        "train_seconds": round(seconds, 1), "quantile_model": res.__dict__, "s3_model": s3_res.__dict__,
        "records": {"train": len(train), "val": len(val), "calibration": len(calib), "test": len(test)},
        "test_metrics": {m.name: m.to_dict() for m in table},
    }
    write_manifest(folder, summary)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    print(f"saved {folder} ({size / 1e6:.2f} MB) in {seconds:.0f}s")
    if table:
        print("held-out test split:\n" + format_table(table, unit))
    return summary


def train_main(ns: argparse.Namespace) -> int:
    spec = default_spec(seed=int(getattr(ns, "seed", 0)), max_minutes=float(getattr(ns, "max_minutes", 10.0)))
    train_predictor(ns.data, ns.out, spec)
    return 0


def eval_main(ns: argparse.Namespace) -> int:
    """Side-by-side metrics of the global median, S3 and ours from one predictor folder."""
    from odma_mlu.predictor.registry import resolve_folder

    _set_threads()
    folder = resolve_folder(ns.predictor)
    ours = load_learned(folder)
    recs = read_records(ns.data)
    if recs and recs[0].unit != ours.unit:
        raise DataFormatError(f"{ns.data}: lengths are in {recs[0].unit}, but the predictor in {folder} was "
                              f"trained on {ours.unit}; train one on this kind of data first")
    recs = select(recs, getattr(ns, "split", "test"))
    if not recs:
        raise DataFormatError(f"{ns.data}: no records in split '{ns.split}'")
    target = ours.target_coverage
    rows: list[PredictorMetrics] = [evaluate(load_median(folder), recs, target), evaluate(load_s3(folder), recs, target),
                                    evaluate(ours, recs, target)]
    no_text = evaluate(ours, recs, target, with_text=False)
    print(f"{ns.data} ({ns.split} split, {len(recs)} records; reserve at target_coverage {target})")
    print(format_table(rows + [replace(no_text, name="learned-notext")], ours.unit))
    lat = measure_latency_ms(ours, [r.features() for r in recs[:64]])
    print(f"latency per request: batch 1 {lat[1]:.2f} ms, batch 32 {lat[32]:.3f} ms")
    if ns.json:
        out = {**{k: v for k, v in rows[-1].to_dict().items() if k != "name"}, "unit": ours.unit,
               "split": ns.split, "predictor": str(folder),
               "baselines": {m.name: m.to_dict() for m in rows[:-1]}, "no_text": no_text.to_dict(),
               "latency_ms_per_request": {"batch1": lat[1], "batch32": lat[32]}}
        Path(ns.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


def measure_latency_ms(pred: LearnedPredictor, feats: Sequence[RequestFeatures], repeats: int = 20) -> dict[int, float]:
    """Median wall time per request (ms) at batch 1 and batch 32, tokenization included."""
    out = {}
    for bs in (1, 32):
        batch = [feats[i % len(feats)] for i in range(bs)]
        pred.predict_batch(batch)
        times = []
        for i in range(repeats):
            b = [feats[(i * bs + j) % len(feats)] for j in range(bs)]
            t = time.perf_counter()
            pred.predict_batch(b)
            times.append((time.perf_counter() - t) * 1000.0 / bs)
        out[bs] = float(np.median(times))
    return out
