"""The request log: one JSON line per finished request, in the format `odma-mlu predictor
train` reads (``lengths/*.jsonl``), so operators fit the length predictor to their own
traffic::

    {"id": "req-17", "prompt": "...", "output_tokens": 812, "max_new_tokens": 16384,
     "prompt_tokens": 95, "finish_reason": "stop", "client": "team-a"}

Opt-in (``server.request_log``): it stores prompt text. Requests that failed or were aborted
are not logged (their length says nothing about the traffic); a request cut at its
``max_new_tokens`` is logged with that cap, as the training data's truncated records are.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from odma_mlu.engine.request import Sequence
from odma_mlu.errors import ConfigError

LOGGED_REASONS = frozenset({"stop", "length"})


class RequestLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigError(f"server.request_log: folder {self.path.parent} does not exist; create it or choose "
                              "another path")
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered: one record per line
        self._lock = threading.Lock()

    def record(self, seq: Sequence) -> bool:
        """Append ``seq`` if it finished normally and carries its prompt text; True if written."""
        feats = seq.features
        if seq.finish_reason not in LOGGED_REASONS or feats is None or feats.prompt_text is None:
            return False
        doc = {"id": seq.request_id, "prompt": feats.prompt_text, "output_tokens": seq.num_generated,
               "max_new_tokens": seq.max_new_tokens, "prompt_tokens": seq.prompt_tokens,
               "finish_reason": seq.finish_reason}
        client = feats.metadata.get("client") if feats.metadata else None
        if client is not None:
            doc["client"] = str(client)
        with self._lock:
            self._file.write(json.dumps(doc, ensure_ascii=False) + "\n")
        return True

    def close(self) -> None:
        with self._lock:
            self._file.close()
