"""``static``: reserve prompt + max_new_tokens for every request (worst case, never overflows)."""

from __future__ import annotations

from odma_mlu.kvcache.policy import ContiguousPolicy, ReserveRequest


class StaticPolicy(ContiguousPolicy):
    name = "static"

    def initial_tokens(self, req: ReserveRequest) -> int:
        return req.max_total_tokens
