"""Predictor metrics exactly as DESIGN.md defines them, over a list of labelled records.

* ``mae``: mean |median prediction - true| (length units);
* ``acc50`` / ``acc100``: share with |median - true| <= 50 / 100;
* ``bucket_acc_s3``: share where the median and the truth fall in the same of 10 equal-width
  buckets over [0, max_new_tokens] (bucket = floor(10 x / max_new_tokens), capped at 9);
* ``coverage``: P[true <= reserved], reserved = the calibrated quantile at ``target_coverage``;
* ``mean_overreserve``: mean (reserved - true); negative terms (under-reservation) count too,
  so a predictor cannot look thrifty by under-covering.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from odma_mlu.predictor.base import LengthPredictor
from odma_mlu.predictor.data import LengthRecord


@dataclass(frozen=True)
class PredictorMetrics:
    name: str
    n: int
    mae: float
    acc50: float
    acc100: float
    bucket_acc_s3: float
    coverage: float
    target_coverage: float
    mean_overreserve: float
    mean_reserved: float

    def to_dict(self) -> dict:
        return asdict(self)


def s3_bucket(x: np.ndarray, max_new: np.ndarray) -> np.ndarray:
    return np.minimum((10.0 * x / max_new).astype(np.int64), 9)


def evaluate(predictor: LengthPredictor, records: Sequence[LengthRecord], target_coverage: float,
             with_text: bool = True, batch_size: int = 256) -> PredictorMetrics:
    """Metrics of ``predictor`` on ``records`` (T=0 lengths), reserving at ``target_coverage``."""
    assert records, "evaluate() needs at least one record"
    feats = [r.features(with_text) for r in records]
    preds = []
    for s in range(0, len(feats), batch_size):
        preds.extend(predictor.predict_batch(feats[s:s + batch_size]))
    y = np.array([r.length for r in records], dtype=np.float64)
    cap = np.array([r.max_new_tokens for r in records], dtype=np.float64)
    med = np.array([p.median for p in preds])
    res = np.array([p.at(target_coverage) for p in preds])
    err = np.abs(med - y)
    return PredictorMetrics(
        name=getattr(predictor, "name", type(predictor).__name__), n=len(records), mae=float(err.mean()),
        acc50=float((err <= 50).mean()), acc100=float((err <= 100).mean()),
        bucket_acc_s3=float((s3_bucket(med, cap) == s3_bucket(y, cap)).mean()),
        coverage=float((y <= res).mean()), target_coverage=float(target_coverage),
        mean_overreserve=float((res - y).mean()), mean_reserved=float(res.mean()))


def format_table(rows: Sequence[PredictorMetrics], unit: str) -> str:
    cols = ("name", "n", "mae", "acc50", "acc100", "bucket_acc_s3", "coverage", "target_coverage",
            "mean_overreserve")
    head = f"{'predictor':<14}{'n':>6}{'mae':>9}{'acc50':>8}{'acc100':>8}{'bkt_s3':>8}{'cover':>8}{'target':>8}" \
           f"{'overres':>10}   (lengths in {unit})"
    lines = [head]
    for m in rows:
        d = m.to_dict()
        lines.append(f"{d[cols[0]]:<14}{d['n']:>6}{d['mae']:>9.1f}{d['acc50']:>8.3f}{d['acc100']:>8.3f}"
                     f"{d['bucket_acc_s3']:>8.3f}{d['coverage']:>8.3f}{d['target_coverage']:>8.2f}"
                     f"{d['mean_overreserve']:>10.1f}")
    return "\n".join(lines)
