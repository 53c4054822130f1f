"""What the decoder forwards (qwen2.py, gemma3.py, bamba.py) share, written once.

- the checkpoint's outer tensors (embedding, final norm, LM head; tied or not);
- the RMS norm as transformers' Qwen2 and Bamba compute it (float32, weight applied after
  the cast back; Gemma-3's ``(1 + w)`` norm is its own);
- the gated MLP ``down(act(gate) * up)`` over one fused gate/up matrix;
- the highest position a batch rotates;
- ``SlidingLayout``: where a model whose attention layers may slide keeps its KV. Full
  layers own the arena's layers, in order; sliding layers keep per-request rings laid into
  the same arena's tensors (``RingPool``, odma_mlu/kvcache/window.py)::

      model layer:   0    1    2    3    4    5        (windows: W W W W W None)
      kind:          S    S    S    S    S    F
      group_index:   0    1    2    3    4    0        (index inside its kind)
      arena layer:                            0        (full layers only)
      ring layer:    0    1    2    3    4             (inside RingPool)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from odma_mlu.config import ModelSpec
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.window import RING_BLOCK_TOKENS, RingPool, arena_flat_groups
from odma_mlu.models.attention import ForwardBatch, arena_attention


def outer_shapes(spec: ModelSpec, final_norm: str = "model.norm.weight") -> dict[str, tuple[int, ...]]:
    """The shapes of a checkpoint's tensors outside its layers: embedding, ``final_norm``, and
    the LM head unless it is tied to the embedding."""
    h, v = spec.hidden_size, spec.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), final_norm: (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def outer_weights(spec: ModelSpec, get: Callable[[str], torch.Tensor], final_norm: str = "model.norm.weight"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embedding, final norm, LM head) from ``get(tensor name)``; a tied head is the embedding
    tensor itself."""
    embed = get("model.embed_tokens.weight")
    lm_head = embed if spec.tie_word_embeddings else get("lm_head.weight")
    return embed, get(final_norm), lm_head


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Qwen2 and Bamba: statistics in float32, ``weight`` applied to
    the result cast back to ``x``'s dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def gated_mlp(x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
              act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> torch.Tensor:
    """``down(act(gate) * up)``, gate and up from one fused matmul (gate rows first)."""
    gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
    return F.linear(act(gate) * up, down_weight)


def max_position(batch: ForwardBatch) -> int:
    """The highest position ``batch`` rotates: the planned one (``ForwardBatch.build`` and the
    graph runner set it), else from its sequences."""
    return batch.max_position if batch.max_position >= 0 else max(s.num_total_tokens for s in batch.seqs) - 1


def layer_groups(layer_windows: tuple[int | None, ...]) -> tuple[int | None, list[int], int, int]:
    """(the sliding window or None, each layer's index inside its group, #full, #sliding)."""
    windows = {w for w in layer_windows if w is not None}
    assert len(windows) <= 1, f"sliding layers with different windows {sorted(windows)}: one ring pool each"
    index: list[int] = []
    counts = {True: 0, False: 0}
    for w in layer_windows:
        index.append(counts[w is None])
        counts[w is None] += 1
    if counts[False] and not counts[True]:
        raise ConfigError(f"every one of the {counts[False]} attention layers slides: not supported for now "
                          "(sliding layers keep their rings in the full-attention layers' arena)")
    return (windows.pop() if windows else None), index, counts[True], counts[False]


class SlidingLayout:
    """The KV layout of a model with full and (maybe) sliding attention layers (the diagram
    above). A model sets ``spec``, ``device``, ``dtype`` and ``scale``, and calls
    ``_set_layer_windows`` once."""

    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    scale: float
    layer_windows: tuple[int | None, ...]
    window_tokens: int | None
    group_index: list[int]
    num_full_layers: int
    num_sliding_layers: int

    def _set_layer_windows(self, layer_windows: tuple[int | None, ...]) -> None:
        self.layer_windows = tuple(layer_windows)
        self.window_tokens, self.group_index, self.num_full_layers, self.num_sliding_layers = \
            layer_groups(self.layer_windows)

    def _full_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                        arena: KVArena, arena_layer: int) -> torch.Tensor:
        """A full layer: write the new K/V to the arena, then its prefill plans and decode groups."""
        return arena_attention(q, k, v, batch, arena.k[arena_layer], arena.v[arena_layer], self.scale)

    def new_arena(self, capacity_tokens: int) -> KVArena:
        """An arena for this model's full-attention layers, on its device and in its dtype."""
        spec = dataclasses.replace(self.spec, num_layers=self.num_full_layers) if self.num_sliding_layers else self.spec
        return KVArena(spec, capacity_tokens, device=self.device, dtype=self.dtype,
                       flat_groups=arena_flat_groups(self, capacity_tokens))

    def new_window_pool(self, arena: KVArena, block_tokens: int = RING_BLOCK_TOKENS) -> RingPool:
        """The rings of this model's sliding layers, laid into ``arena``'s lanes."""
        assert self.window_tokens is not None, "new_window_pool on a model without sliding layers"
        return RingPool(arena, self.num_sliding_layers, self.window_tokens, block_tokens,
                        num_kv_heads=self.spec.num_kv_heads, head_dim=self.spec.head_dim)
