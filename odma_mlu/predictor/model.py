"""The small Transformer encoder shared by our quantile predictor and the S3 baseline.

Text -> token + position embeddings -> N pre-norm encoder layers -> masked mean pool,
concatenated with numeric request features (log prompt length, temperature, log
max_new_tokens, has-text flag) -> MLP -> head. Two heads:

* ``quantile``: quantiles of the length as a *fraction of max_new_tokens* (so one model
  serves any cap), in log space, built as a base value plus cumulative softplus increments
  so quantiles never cross.
* ``classes``: logits over the 10 equal-width S3 buckets of [0, max_new_tokens].

Numeric features let the same weights predict with no text (the [CLS]-only input plus
has_text = 0 is trained by dropping text for a share of examples).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from odma_mlu.predictor.tokenizer import PAD_ID

NUM_FEATURES = 4


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ff_dim: int = 128
    max_len: int = 64
    tail_tokens: int = 16
    num_outputs: int = 5
    head: str = "quantile"  # "quantile" or "classes"
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


def numeric_features(prompt_tokens: torch.Tensor, temperature: torch.Tensor, max_new_tokens: torch.Tensor,
                     has_text: torch.Tensor) -> torch.Tensor:
    """Scaled to roughly unit range so no feature dominates the MLP at init."""
    return torch.stack([torch.log1p(prompt_tokens.float()) / 8.0, temperature.float(),
                        torch.log1p(max_new_tokens.float()) / 8.0, has_text.float()], dim=-1)


class LengthEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD_ID)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.num_heads, cfg.ff_dim, cfg.dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.layers = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False) \
            if cfg.num_layers > 0 else None
        self.norm = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model + NUM_FEATURES, cfg.d_model), nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.d_model, cfg.num_outputs))
        # Auxiliary head: log reference-answer length (multi-task signal from Alpaca 52K).
        self.aux = nn.Linear(cfg.d_model + NUM_FEATURES, 1)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def embed(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        mask = ids != PAD_ID
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(pos)[None]
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~mask)
        x = self.norm(x)
        m = mask.unsqueeze(-1).float()
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return torch.cat([pooled, feats], dim=-1)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (head output, auxiliary output). Quantile head: monotone values in
        log-fraction space, log(length / max_new_tokens)."""
        h = self.embed(ids, feats)
        out = self.mlp(h)
        if self.cfg.head == "quantile":
            base = out[:, :1]
            inc = nn.functional.softplus(out[:, 1:])
            out = torch.cat([base, base + torch.cumsum(inc, dim=1)], dim=1)
        return out, self.aux(h).squeeze(-1)


def pinball_loss(pred_fraction: torch.Tensor, y_fraction: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Pinball (quantile) loss on the length as a fraction of max_new_tokens. Linear space, not
    log, so the median head minimizes absolute error: the MAE we report."""
    diff = y_fraction[:, None] - pred_fraction
    return torch.maximum(levels[None] * diff, (levels[None] - 1.0) * diff).mean()


def init_quantile_bias(model: LengthEncoder, fractions: torch.Tensor, levels: torch.Tensor) -> None:
    """Start the head at the training set's marginal quantiles (faster, stabler training)."""
    q = torch.quantile(fractions.clamp_min(1e-4), levels).log()
    last = model.mlp[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.bias.zero_()
        last.bias[0] = q[0]
        for i in range(1, len(q)):
            gap = float(max(q[i] - q[i - 1], 1e-3))
            last.bias[i] = math.log(math.expm1(gap))  # softplus^-1
        last.weight.mul_(0.1)
