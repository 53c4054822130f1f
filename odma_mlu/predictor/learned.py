"""The learned predictors as ``LengthPredictor``s, and their on-disk folder format.

Folder (flat, so the package-data glob ``predictor/default/*`` ships all of it)::

    manifest.json        format_version, package_version, unit, target_coverage, configs,
                         training summary, held-out metrics
    model.safetensors    quantile encoder weights (fp16 on disk: half the bytes, and
                         the predictions move by far less than a token)
    tokenizer.json       the BPE tokenizer trained on the training prompts
    calibration.json     conformal factors for the quantile encoder
    s3.safetensors       S3 baseline classifier (same encoder, 10-bucket head)
    s3_calibration.json  its conformal factors
    median.json          the global-median baseline (marginal quantiles + calibration)

Why fp16 on disk and fp32 in memory: CPU matmuls in fp16 are slow, the bytes are not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from odma_mlu import __version__
from odma_mlu.errors import ConfigError
from odma_mlu.predictor.base import QUANTILES, LengthPrediction, LengthPredictor, RequestFeatures
from odma_mlu.predictor.calibration import Calibration, OnlineConformal
from odma_mlu.predictor.model import EncoderConfig, LengthEncoder, numeric_features
from odma_mlu.predictor.tokenizer import PromptEncoder

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class PredictorFormatError(ConfigError):
    """A predictor folder is missing, incomplete, or from another format version."""


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise PredictorFormatError(f"{folder}: not a predictor folder (no {MANIFEST}); train one with "
                                   f"`odma-mlu predictor train --data FILE --out {folder}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PredictorFormatError(f"{path}: unreadable manifest ({e}); retrain the predictor") from None
    found = manifest.get("format_version")
    if found != FORMAT_VERSION:
        raise PredictorFormatError(
            f"{folder}: predictor format version {found} (written by odma-mlu "
            f"{manifest.get('package_version', '?')}), but this odma-mlu {__version__} reads format version "
            f"{FORMAT_VERSION}; retrain with `make predictor` or `odma-mlu predictor train`")
    return manifest


def prompt_tokens_of(r: RequestFeatures) -> int:
    """Prompt length feature: chars/4 when text is given (as in training, where the serving
    model's token count is unknown), else the caller's ``prompt_tokens``."""
    return max(1, len(r.prompt_text) // 4) if r.prompt_text is not None else max(1, int(r.prompt_tokens))


class _EncoderPredictor(LengthPredictor):
    """Shared batching: tokenize, one forward pass, per-request post-processing."""

    def __init__(self, model: LengthEncoder, encoder: PromptEncoder, calibration: Calibration, unit: str) -> None:
        self.model = model.eval()
        self.encoder = encoder
        self.calibration = calibration
        self.online: OnlineConformal | None = None
        self.unit = unit

    @property
    def target_coverage(self) -> float:
        return self.calibration.target_coverage

    def enable_online_calibration(self, window: int = 1000, refit_every: int = 200) -> None:
        """Re-fit conformal factors from ``observe()`` feedback (see calibration.py)."""
        self.online = OnlineConformal(self.calibration, window, refit_every, min(window, 200))

    def _forward(self, requests: Sequence[RequestFeatures]) -> np.ndarray:
        batch = self.encoder.encode([r.prompt_text for r in requests])
        feats = numeric_features(torch.tensor([prompt_tokens_of(r) for r in requests]),
                                 torch.tensor([float(r.temperature) for r in requests]),
                                 torch.tensor([float(r.max_new_tokens) for r in requests]),
                                 torch.tensor([r.prompt_text is not None for r in requests], dtype=torch.float32))
        with torch.inference_mode():
            out, _ = self.model(torch.from_numpy(batch.ids), feats)
        return out.numpy().astype(np.float64)

    def raw_quantiles(self, requests: Sequence[RequestFeatures]) -> np.ndarray:
        """(n, len(QUANTILES)) uncalibrated quantiles in length units."""
        raise NotImplementedError

    def predict_batch(self, requests: Sequence[RequestFeatures]) -> list[LengthPrediction]:
        if not requests:
            return []
        raw = self.raw_quantiles(requests)
        cal = self.online.calibration if self.online is not None else self.calibration
        return [LengthPrediction.from_values(cal.apply(raw[i], r.prompt_text is not None), r.max_new_tokens)
                for i, r in enumerate(requests)]

    def predict(self, request: RequestFeatures) -> LengthPrediction:
        return self.predict_batch([request])[0]

    def observe(self, request: RequestFeatures, generated_tokens: int) -> None:
        if self.online is not None:
            self.online.observe(self.raw_quantiles([request])[0], generated_tokens, request.prompt_text is not None)


class LearnedPredictor(_EncoderPredictor):
    """Our predictor: Transformer encoder with a monotone quantile head + conformal factors."""

    name = "learned"

    def raw_quantiles(self, requests: Sequence[RequestFeatures]) -> np.ndarray:
        frac = np.exp(self._forward(requests))
        return frac * np.array([[float(r.max_new_tokens)] for r in requests])


class S3Predictor(_EncoderPredictor):
    """S3 baseline: 10 equal-width buckets over [0, max_new_tokens], softmax classifier.

    Point estimate (the median level) = the midpoint of the most likely bucket (S3 itself
    reserves the bucket's upper edge; the midpoint gives it a lower MAE); higher levels come from the predicted class CDF (uniform within a
    bucket), then the same conformal calibration as ours, so coverage is comparable."""

    name = "s3"

    def raw_quantiles(self, requests: Sequence[RequestFeatures]) -> np.ndarray:
        logits = self._forward(requests)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        k = p.shape[1]
        cdf = np.concatenate([np.zeros((len(p), 1)), np.cumsum(p, 1)], 1)
        out = np.empty((len(p), len(QUANTILES)))
        for i, r in enumerate(requests):
            edges = np.linspace(0.0, float(r.max_new_tokens), k + 1)
            b = int(np.argmax(p[i]))
            out[i, 0] = 0.5 * (edges[b] + edges[b + 1])
            out[i, 1:] = np.interp(QUANTILES[1:], cdf[i], edges)
        return np.maximum.accumulate(out, axis=1)

    def bucket(self, request: RequestFeatures) -> int:
        return int(np.argmax(self._forward([request])[0]))


class MedianPredictor(LengthPredictor):
    """Global-median baseline: the training set's marginal quantiles (as a fraction of
    max_new_tokens, so it transfers across caps), conformally calibrated like the others."""

    name = "median"

    def __init__(self, fractions: Sequence[float], calibration: Calibration, unit: str = "tokens") -> None:
        self.fractions = np.asarray(fractions, dtype=np.float64)
        self.calibration = calibration
        self.unit = unit

    @property
    def target_coverage(self) -> float:
        return self.calibration.target_coverage

    def raw_quantiles(self, requests: Sequence[RequestFeatures]) -> np.ndarray:
        return self.fractions[None, :] * np.array([[float(r.max_new_tokens)] for r in requests])

    def predict(self, request: RequestFeatures) -> LengthPrediction:
        raw = self.raw_quantiles([request])[0]
        return LengthPrediction.from_values(self.calibration.apply(raw, True), request.max_new_tokens)

    def to_dict(self) -> dict:
        return {"fractions": list(self.fractions), "calibration": self.calibration.to_dict(), "unit": self.unit}

    @classmethod
    def from_dict(cls, d: dict) -> "MedianPredictor":
        return cls(d["fractions"], Calibration.from_dict(d["calibration"]), d.get("unit", "tokens"))


def save_encoder(folder: Path, stem: str, model: LengthEncoder, calibration: Calibration) -> None:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / f"{stem}.safetensors"), metadata={"config": json.dumps(model.cfg.to_dict())})
    (folder / f"{stem}.safetensors").chmod(0o644)  # safetensors writes 0600; package data must be readable
    cal_name = "calibration.json" if stem == "model" else f"{stem}_calibration.json"
    (folder / cal_name).write_text(json.dumps(calibration.to_dict(), indent=1), encoding="utf-8")


def _load_encoder(folder: Path, stem: str) -> tuple[LengthEncoder, Calibration]:
    weights = folder / f"{stem}.safetensors"
    cal_name = "calibration.json" if stem == "model" else f"{stem}_calibration.json"
    if not weights.is_file() or not (folder / cal_name).is_file():
        raise PredictorFormatError(f"{folder}: missing {weights.name} or {cal_name}; retrain the predictor")
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        cfg = EncoderConfig(**json.loads(f.metadata()["config"]))
    model = LengthEncoder(cfg)
    model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    return model.eval(), Calibration.from_dict(json.loads((folder / cal_name).read_text(encoding="utf-8")))


def _prompt_encoder(folder: Path, manifest: dict) -> PromptEncoder:
    cfg = manifest["encoder"]
    return PromptEncoder.load(folder / "tokenizer.json", int(cfg["max_len"]), int(cfg["tail_tokens"]))


def load_learned(folder: str | Path) -> LearnedPredictor:
    folder = Path(folder)
    manifest = read_manifest(folder)
    model, cal = _load_encoder(folder, "model")
    return LearnedPredictor(model, _prompt_encoder(folder, manifest), cal, manifest.get("unit", "tokens"))


def load_s3(folder: str | Path) -> S3Predictor:
    folder = Path(folder)
    manifest = read_manifest(folder)
    model, cal = _load_encoder(folder, "s3")
    return S3Predictor(model, _prompt_encoder(folder, manifest), cal, manifest.get("unit", "tokens"))


def load_median(folder: str | Path) -> MedianPredictor:
    folder = Path(folder)
    read_manifest(folder)
    path = folder / "median.json"
    if not path.is_file():
        raise PredictorFormatError(f"{folder}: missing median.json; retrain the predictor")
    return MedianPredictor.from_dict(json.loads(path.read_text(encoding="utf-8")))


def write_manifest(folder: Path, extra: dict) -> None:
    manifest = {"format_version": FORMAT_VERSION, "package_version": __version__, **extra}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
