"""Per-layer attention kinds of a config.json: which layers slide, and over how many tokens.

transformers 5 writes ``layer_types`` (``"full_attention"`` / ``"sliding_attention"`` per
layer) and ``sliding_window`` into config.json. Older files give the pattern instead:

    qwen2:        sliding layers are i >= max_window_layers, and only when use_sliding_window
    gemma3_text:  layer i slides unless (i + 1) % sliding_window_pattern == 0  (5 local : 1 global)

``layer_windows`` turns either form into one entry per layer: the window in tokens, or None
for full attention. The loader, the models and the emulator's replay all read it.
"""

from __future__ import annotations

from typing import Any, Mapping

from odma_mlu.errors import ConfigError

FULL = "full_attention"
SLIDING = "sliding_attention"


def layer_windows(cfg: Mapping[str, Any], where: str = "config.json") -> tuple[int | None, ...]:
    """One entry per layer: the sliding window in tokens, or None (full attention)."""
    num_layers = int(cfg["num_hidden_layers"])
    model_type = cfg.get("model_type")
    if model_type == "qwen2":
        # Qwen2Config drops the window unless use_sliding_window: its sliding layers then attend fully.
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        default = [SLIDING if window is not None and i >= int(cfg.get("max_window_layers", 28)) else FULL
                   for i in range(num_layers)]
    elif model_type == "gemma3_text":
        window = cfg.get("sliding_window", 4096)
        pattern = int(cfg.get("sliding_window_pattern", 6))
        default = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    else:
        window = cfg.get("sliding_window")
        default = [SLIDING if window is not None else FULL] * num_layers
    types = cfg.get("layer_types") or default
    if not isinstance(types, list) or len(types) != num_layers:
        raise ConfigError(f"{where}: layer_types must list one type per layer ({num_layers}), got {types!r}")
    unknown = sorted({t for t in types if t not in (FULL, SLIDING)})
    if unknown:
        raise ConfigError(f"{where}: layer types {unknown} are not supported; odma-mlu runs {FULL!r} and {SLIDING!r}")
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise ConfigError(f"{where}: sliding_window {window!r} must be a positive number of tokens")
    return tuple(window if t == SLIDING and window is not None else None for t in types)


def describe(windows: tuple[int | None, ...]) -> str:
    """'40 sliding (1024) + 8 full' style summary for logs and tables."""
    sliding = [w for w in windows if w is not None]
    if not sliding:
        return f"{len(windows)} full"
    return f"{len(sliding)} sliding ({sliding[0]}) + {len(windows) - len(sliding)} full"
