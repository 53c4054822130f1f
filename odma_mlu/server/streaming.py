"""Turning engine outputs into text for clients: incremental detokenization and stop strings.

The engine hands out token ids; text is decoded here on the event loop with the server's
own tokenizer instance (the engine thread owns the engine's). Streaming must never emit text
it would later take back, so two tails are held until the next token:

- a trailing U+FFFD: byte-level BPE splits multi-byte characters across tokens;
- the last ``len(longest stop string) - 1`` characters: they may be the start of a stop
  string, which must not reach the client.
"""

from __future__ import annotations

from typing import Any, Sequence


class Detokenizer:
    """Decodes a growing list of generated ids; ``update`` returns the new, final text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self._tok = tokenizer
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.sent = 0
        self.text = ""

    def _cut(self, text: str) -> tuple[str, bool]:
        hits = [i for s in self._stop if (i := text.find(s)) >= 0]
        return (text[:min(hits)], True) if hits else (text, False)

    def update(self, token_ids: Sequence[int], finished: bool) -> str:
        text = self._tok.decode(list(token_ids), skip_special_tokens=True) if self._tok is not None else ""
        text, cut = self._cut(text)
        if finished or cut:
            end = len(text)
        else:
            end = len(text) - self._hold
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        self.text = text
        new = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return new
