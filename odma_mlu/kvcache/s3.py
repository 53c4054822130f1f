"""``s3``: S3 (NeurIPS 2023) fixed equal-width buckets from a predicted length class.

The predictor's median picks one of ``num_buckets`` equal-width classes over
[0, max_new_tokens]; the request reserves prompt + the class's upper edge. On overflow S3
preempts the request and re-queues it with the next bucket (its KV is recomputed).
"""

from __future__ import annotations

import math

from odma_mlu.kvcache.arena import KVArena, KVLocation
from odma_mlu.kvcache.policy import ContiguousPolicy, GrowResult, GrowStatus, ReserveRequest


class S3Policy(ContiguousPolicy):
    name = "s3"
    uses_prediction = True

    def __init__(self, arena: KVArena, num_buckets: int = 10) -> None:
        super().__init__(arena)
        assert num_buckets >= 1, "s3 needs at least one bucket"
        self.num_buckets = num_buckets
        self._min_bucket: dict[str, int] = {}  # raised after each overflow

    def bucket_edge(self, max_new_tokens: int, index: int) -> int:
        width = max_new_tokens / self.num_buckets
        return int(math.ceil(width * (index + 1)))

    def bucket_index(self, req: ReserveRequest) -> int:
        width = req.max_new_tokens / self.num_buckets
        predicted = req.prediction.median if req.prediction is not None else req.max_new_tokens
        idx = min(self.num_buckets - 1, max(0, int(math.ceil(predicted / width)) - 1))
        generated = req.num_tokens - req.prompt_tokens
        while idx < self.num_buckets - 1 and self.bucket_edge(req.max_new_tokens, idx) <= generated:
            idx += 1
        return max(idx, self._min_bucket.get(req.request_id, 0))

    def initial_tokens(self, req: ReserveRequest) -> int:
        edge = self.bucket_edge(req.max_new_tokens, self.bucket_index(req))
        return max(req.num_tokens, req.prompt_tokens + min(edge, req.max_new_tokens))

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        loc = super().reserve(req)
        if loc is not None:
            self._min_bucket[req.request_id] = self.bucket_index(req)
        return loc

    def grow(self, request_id: str, needed_tokens: int) -> GrowResult:
        self._min_bucket[request_id] = min(self.num_buckets - 1, self._min_bucket.get(request_id, 0) + 1)
        return GrowResult(GrowStatus.REQUEUE)

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        super().release(request_id, generated_tokens)
        if generated_tokens is not None:
            self._min_bucket.pop(request_id, None)
