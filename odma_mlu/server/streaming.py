"""Turning engine outputs into text for clients: incremental detokenization, stop strings,
the DeepSeek-R1 reasoning split and log-probabilities.

The engine hands out token ids; text is decoded here on the event loop with the server's
own tokenizer instance (the engine thread owns the engine's). Decoding is incremental
(``IncrementalDecoder``: each step decodes only the newest tokens with a little context), so
a 30,000-token reasoning stream costs O(tokens), not O(tokens^2). Streaming never emits text
it would later take back, so two tails are held until the next token:

- an incomplete multi-byte character (byte-level BPE splits them across tokens);
- the last ``len(longest stop string) - 1`` characters: they may be the start of a stop
  string, which must not reach the client.
"""

from __future__ import annotations

from typing import Any, Sequence

from odma_mlu.engine.sampler import IncrementalDecoder, TokenLogprobs

REASONING_PARSERS = ("deepseek_r1",)


class Detokenizer:
    """Decodes a growing list of generated ids; ``update`` returns the new, final text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], skip_special_tokens: bool = True) -> None:
        self._dec = IncrementalDecoder(tokenizer, skip_special_tokens)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.sent = 0
        self.text = ""
        self.stopped = False

    def _cut(self, text: str, begin: int) -> tuple[str, bool]:
        hits = [i for s in self._stop if (i := text.find(s, begin)) >= 0]
        return (text[:min(hits)], True) if hits else (text, False)

    def update(self, token_ids: Sequence[int], finished: bool) -> str:
        if self.stopped:
            return ""
        checked = len(self._dec.text)
        self._dec.update(token_ids)
        if finished:
            self._dec.flush(token_ids)
        text, cut = self._cut(self._dec.text, max(0, checked - self._hold))
        if finished or cut:
            end = len(text)
        else:
            end = len(text) - self._hold
        self.stopped = cut
        self.text = text
        new = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return new


class ReasoningParser:
    """DeepSeek-R1's ``<think> ... </think> answer`` split, as vLLM's ``deepseek_r1`` parser.

    R1's chat template ends the prompt with ``<think>\\n``, so the output usually starts inside
    the reasoning and only ``</think>`` appears; a leading ``<think>`` is dropped when the
    model does emit it. Everything before ``</think>`` is ``reasoning_content``, everything
    after is ``content``; an output that never closes the tag is all reasoning. Works on
    streamed text deltas: a tail that may be the start of a tag is held until it is decided.
    """

    START, END = "<think>", "</think>"

    def __init__(self) -> None:
        self._buf = ""
        self._in_reasoning = True
        self._start_checked = False
        self.reasoning = ""
        self.content = ""

    @staticmethod
    def _partial_suffix(text: str, tag: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
        for k in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:k]):
                return k
        return 0

    def update(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Feed new text; returns (reasoning delta, content delta)."""
        self._buf += delta
        r_out, c_out = "", ""
        if not self._start_checked:
            stripped = self._buf.lstrip()
            if stripped.startswith(self.START):
                self._buf = stripped[len(self.START):]
                self._start_checked = True
            elif self.START.startswith(stripped) and not final:
                return "", ""  # could still become "<think>"
            else:
                self._start_checked = True
        if self._in_reasoning:
            i = self._buf.find(self.END)
            if i >= 0:
                r_out, self._buf = self._buf[:i], self._buf[i + len(self.END):]
                self._in_reasoning = False
            else:
                keep = 0 if final else self._partial_suffix(self._buf, self.END)
                r_out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        if not self._in_reasoning:
            c_out, self._buf = self._buf, ""
        self.reasoning += r_out
        self.content += c_out
        return r_out, c_out

    @classmethod
    def split(cls, text: str) -> tuple[str | None, str]:
        """Whole-text form: (reasoning or None, content)."""
        p = cls()
        p.update(text, final=True)
        return (p.reasoning if p.reasoning or not p.content else None), p.content


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else str(token_id)


def completion_logprobs(tokenizer: Any, items: Sequence[TokenLogprobs], text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for ``items``."""
    tokens, lps, tops, offsets = [], [], [], []
    at = text_offset
    for it in items:
        t = _token_text(tokenizer, it.token_id)
        tokens.append(t)
        lps.append(it.logprob)
        top: dict[str, float] = {}
        for i, lp in it.top:  # best first; tokens that decode alike keep the best value
            top.setdefault(_token_text(tokenizer, i), lp)
        tops.append(top or None)
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, items: Sequence[TokenLogprobs]) -> dict[str, Any]:
    """The chat ``logprobs`` object (``{"content": [{token, logprob, bytes, top_logprobs}]}``)."""
    def entry(token_id: int, lp: float) -> dict[str, Any]:
        t = _token_text(tokenizer, token_id)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))}

    return {"content": [{**entry(it.token_id, it.logprob), "top_logprobs": [entry(i, lp) for i, lp in it.top]}
                        for it in items]}
