"""``exact``: one run of exactly prompt + true length per request (static reservation that
knows every length). Not an upper bound: on heavy tails the reserved-but-unused room loses
to paging (``ideal`` is the bound).

Where the true length is unknown (a live request), it reserves the worst case, like static.
"""

from __future__ import annotations

from odma_mlu.kvcache.policy import ContiguousPolicy, ReserveRequest


class ExactPolicy(ContiguousPolicy):
    name = "exact"

    def initial_tokens(self, req: ReserveRequest) -> int:
        if req.true_output_tokens is None:
            return req.max_total_tokens
        # The last generated token's KV is never written: prompt + L - 1 slots suffice,
        # but keep prompt + L so a recompute (num_tokens up to prompt + L - 1) always fits.
        return max(req.num_tokens, req.prompt_tokens + min(req.true_output_tokens, req.max_new_tokens))
