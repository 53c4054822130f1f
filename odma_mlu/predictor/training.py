"""Training loops for the quantile encoder and the S3 classifier (same encoder, same data).

Why the choices:
* every temperature sample of a prompt is a training example (temperature is a feature):
  four noisy draws of one prompt's length teach its conditional distribution, not one draw;
* text is dropped for ``text_dropout`` of examples so the no-text path (length + metadata
  only) is trained by the same weights;
* an auxiliary loss predicts the log length of Alpaca 52K's reference answers (train split
  ids only): 5x more prompts than the labelled file, a free signal about "how long an answer
  this instruction asks for". The S3 baseline gets the same auxiliary signal, so the
  comparison isolates the head and loss;
* early stopping on a validation slice carved from the *train* split, so the calibration
  split stays untouched for conformal calibration.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from odma_mlu.predictor.base import QUANTILES
from odma_mlu.predictor.data import LengthRecord
from odma_mlu.predictor.model import EncoderConfig, LengthEncoder, init_quantile_bias, numeric_features, pinball_loss
from odma_mlu.predictor.tokenizer import PromptEncoder

NUM_S3_BUCKETS = 10


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    text_dropout: float = 0.15
    aux_weight: float = 0.5
    max_seconds: float = 240.0
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    seconds: float
    epochs_run: int
    best_epoch: int
    best_val_loss: float


@dataclass(frozen=True)
class Tensors:
    """Pre-encoded examples (encoding once keeps the epoch loop pure tensor work)."""

    ids: torch.Tensor
    feats_text: torch.Tensor
    feats_none: torch.Tensor
    y: torch.Tensor  # length / max_new_tokens
    max_new: torch.Tensor


def is_validation(record_id: str) -> bool:
    """1 in 10 train-split records, by a hash independent of the split hash."""
    return hashlib.md5(record_id.encode("utf-8", "replace")).digest()[0] % 10 == 0


def expand_temperatures(records: list[LengthRecord]) -> list[LengthRecord]:
    out = []
    for r in records:
        out.append(r)
        for t, n in r.other_temperatures:
            out.append(LengthRecord(r.record_id, r.prompt, min(n, r.max_new_tokens), r.max_new_tokens, t, r.unit))
    return out


def to_tensors(enc: PromptEncoder, records: list[LengthRecord]) -> Tensors:
    b = enc.encode([r.prompt for r in records])
    n = len(records)
    prompt_tokens = torch.tensor([max(1, len(r.prompt) // 4) for r in records])
    temp = torch.tensor([r.temperature for r in records])
    max_new = torch.tensor([r.max_new_tokens for r in records], dtype=torch.float32)
    ft = numeric_features(prompt_tokens, temp, max_new, torch.ones(n))
    fn = numeric_features(prompt_tokens, temp, max_new, torch.zeros(n))
    y = torch.tensor([r.length for r in records], dtype=torch.float32) / max_new
    return Tensors(torch.from_numpy(b.ids), ft, fn, y, max_new)


def _batch_loss(model: LengthEncoder, t: Tensors, idx: torch.Tensor, levels: torch.Tensor, drop: float,
                gen: torch.Generator) -> torch.Tensor:
    ids = t.ids[idx]
    ids = ids[:, : max(1, int((ids != 0).sum(1).max()))]
    no_text = torch.rand(len(idx), generator=gen) < drop
    feats = torch.where(no_text[:, None], t.feats_none[idx], t.feats_text[idx])
    ids = torch.where(no_text[:, None], torch.where(torch.arange(ids.shape[1]) == 0, ids, 0), ids)
    out, _ = model(ids, feats)
    y = t.y[idx]
    if model.cfg.head == "quantile":
        return pinball_loss(out.exp(), y, levels) * 10.0
    cls = (y * NUM_S3_BUCKETS).long().clamp(0, NUM_S3_BUCKETS - 1)
    return nn.functional.cross_entropy(out, cls)


def _aux_loss(model: LengthEncoder, a: Tensors, idx: torch.Tensor) -> torch.Tensor:
    ids = a.ids[idx]
    ids = ids[:, : max(1, int((ids != 0).sum(1).max()))]
    _, aux = model(ids, a.feats_text[idx])
    target = torch.log1p(a.y[idx] * a.max_new[idx]) / 8.0
    return nn.functional.mse_loss(aux, target)


def fit(cfg_model: EncoderConfig, enc: PromptEncoder, train: list[LengthRecord], val: list[LengthRecord],
        aux: list[LengthRecord], cfg: TrainConfig, log: bool = True) -> tuple[LengthEncoder, TrainResult]:
    """Train one encoder (quantile or classes head); keep the epoch with the best val loss."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    levels = torch.tensor(QUANTILES)
    model = LengthEncoder(cfg_model)
    tr = to_tensors(enc, expand_temperatures(train))
    va = to_tensors(enc, val)
    ax = to_tensors(enc, aux) if aux else None
    if cfg_model.head == "quantile":
        init_quantile_bias(model, tr.y, levels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # One epoch = as many examples as there are prompts (a random draw among each prompt's
    # temperature samples, in expectation), so the cost does not grow 4x with the samples.
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.1)
    t0 = time.monotonic()
    best = (float("inf"), -1)
    best_state: dict[str, torch.Tensor] = {}
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(tr.y), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            loss = _batch_loss(model, tr, idx, levels, cfg.text_dropout, gen)
            if ax is not None and cfg.aux_weight > 0:
                aidx = torch.randint(len(ax.y), (cfg.batch_size // 2,), generator=gen)
                loss = loss + cfg.aux_weight * _aux_loss(model, ax, aidx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        val_loss = evaluate_loss(model, va, levels)
        if log:
            print(f"  [{cfg_model.head}] epoch {epoch}: val loss {val_loss:.4f} ({time.monotonic() - t0:.0f}s)",
                  flush=True)
        if val_loss < best[0]:
            best = (val_loss, epoch)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if time.monotonic() - t0 > cfg.max_seconds:
            print(f"  [{cfg_model.head}] stopping at the time budget ({cfg.max_seconds:.0f}s)", flush=True)
            break
    model.load_state_dict(best_state)
    model.eval()
    return model, TrainResult(time.monotonic() - t0, epoch, best[1], best[0])


@torch.inference_mode()
def evaluate_loss(model: LengthEncoder, t: Tensors, levels: torch.Tensor) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(0)
    total, n = 0.0, 0
    for s in range(0, len(t.y), 256):
        idx = torch.arange(s, min(s + 256, len(t.y)))
        total += float(_batch_loss(model, t, idx, levels, 0.0, gen)) * len(idx)
        n += len(idx)
    return total / max(1, n)
