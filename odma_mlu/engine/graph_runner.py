"""Decode steps replayed from captured device graphs (CUDA graphs, MLU graphs), obtained from
the backend (``Backend.new_graph``).

A 7B decode step issues over a thousand small kernels; on a GPU or an MLU their launches,
not the memory, bound small batches. A captured graph replays them with one launch, but
needs fixed shapes, so a decode-only step is padded to a *graph key*::

    batch B real sequences  -> B_pad: the next size in GRAPH_BATCH_SIZES (1, 2, 4, 8, 16, 24, 32, ...)
    longest context L       -> S: graph_span_tokens(L) (a power of two, at least 64)
    one attention group of B_pad x S slots (a gather; masked past each sequence's length)

Padding rows repeat row 0 exactly (same token, position, write slot and KV slots): they
write the very same K/V into row 0's slot, so the duplicate write is harmless, and their
logits are dropped. Static input tensors are filled with ``copy_`` each step and the graph
is replayed; one graph per key, captured on first use, all sharing one memory pool.

Only for a model whose every layer reads the arena (no sliding-window rings, no SSM
states) and only for decode-only steps: prefill steps (and chunked-prefill steps) run
eagerly. With a device profile (``pricer``, the engine's cost model) a step takes the
graph only where that is faster (``CostModel.graph_pays``): one group padded to B_pad x S
gathers and reads far more than the eager groups (each padded only to its own longest
member) when contexts differ, and on an LPDDR card those bytes cost more than the
launches a graph saves (the emulated MLU370-X4: the graph is slower on 98% of the
decode-only steps of 200 ServeGen requests and on half of Alpaca's). Without a profile
every step that fits takes the graph. ``graph=None`` (a backend without graphs, e.g. CPU
in tests) runs the same padded static path eagerly, which checks the padding logic
anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from odma_mlu.backends.base import Backend, DeviceGraph
from odma_mlu.engine.step_work import StepWork, ViewRule, graph_span_tokens
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.models.attention import DecodeGroup, ForwardBatch, SequenceInput

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


@runtime_checkable
class StepPricer(Protocol):
    """The device's step costs (the emulator's ``CostModel`` of the engine's profile)."""

    def graph_pays(self, eager: StepWork, batch_pad: int, span_tokens: int) -> bool: ...


def graph_pays(pricer: StepPricer, inputs: Sequence[SequenceInput], views: ViewRule | None = None) -> bool:
    """Whether a decode-only step is faster replayed from the graph of its key (one group of
    B_pad x S slots) than run eagerly (groups by ``decode_group_key``, each padded to its own
    longest member; a lone one-run sequence a view). O(batch) integer work, no run lists:
    the grouping needs only each context and whether it is one run, so a sequence past its
    first run is described as two (all but its newest token in one run: with a view length,
    a long one is priced as read in parts, which its real runs may not allow)."""
    batch, span = DecodeGraphRunner.key(inputs)
    reads = [(n,) if n <= s.location.runs[0][1] else (n - 1, 1)
             for s, n in ((s, s.num_total_tokens) for s in inputs)]
    return pricer.graph_pays(StepWork.build((), reads, views=views), batch, span)


@dataclass
class _Captured:
    batch: ForwardBatch
    """Static inputs (the graph reads these tensors)."""
    graph: DeviceGraph | None
    output: torch.Tensor | None


class DecodeGraphRunner:
    """Runs decode-only steps of ``model`` over ``arena`` from captured graphs."""

    def __init__(self, model: Any, arena: KVArena, backend: Backend, max_batch: int = 256,
                 max_span_tokens: int = 8192, use_graphs: bool = True, pricer: StepPricer | None = None,
                 views: ViewRule | None = None) -> None:
        """``views``: the engine's eager rule (``StepWork.build``), which the
        pricer's comparison describes."""
        self.model, self.arena, self.backend = model, arena, backend
        self.pricer = pricer
        self.views = views
        self.eager_by_price = 0
        """Decode-only steps that fit but ran eagerly because the graph's padding costs more."""
        self.device = model.device
        self.max_batch = max(b for b in GRAPH_BATCH_SIZES if b <= max(1, max_batch))
        self.max_span_tokens = max_span_tokens
        self.use_graphs = use_graphs
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._pool_owner: DeviceGraph | None = None
        self.replays = 0

    def fits(self, inputs: Sequence[SequenceInput]) -> bool:
        """A decode-only step this runner can take (size and context within its keys) and,
        with a pricer, one the graph runs faster than the eager groups."""
        if not self._within_keys(inputs):
            return False
        if self.pricer is not None and not graph_pays(self.pricer, inputs, self.views):
            self.eager_by_price += 1
            return False
        return True

    def _within_keys(self, inputs: Sequence[SequenceInput]) -> bool:
        if not inputs or len(inputs) > self.max_batch or any(len(s.token_ids) != 1 for s in inputs):
            return False
        return graph_span_tokens(max(s.num_total_tokens for s in inputs)) <= self.max_span_tokens

    @staticmethod
    def key(inputs: Sequence[SequenceInput]) -> tuple[int, int]:
        b = next(x for x in GRAPH_BATCH_SIZES if x >= len(inputs))
        return b, graph_span_tokens(max(s.num_total_tokens for s in inputs))

    def _host_batch(self, inputs: Sequence[SequenceInput], batch: int, span: int) -> ForwardBatch:
        """The padded step on the host: one decode group of ``batch`` x ``span`` slots."""
        padded = list(inputs) + [inputs[0]] * (batch - len(inputs))
        lengths = torch.tensor([s.num_total_tokens for s in padded], dtype=torch.int64)
        j = torch.arange(span, dtype=torch.int64)
        valid = j[None, :] < lengths[:, None]
        gather = torch.zeros(batch, span, dtype=torch.int64)
        for b, s in enumerate(padded[:len(inputs)]):
            n = s.num_total_tokens
            gather[b, :n] = s.location.slot_table()[:n]
        gather[len(inputs):] = gather[0]
        write = gather[torch.arange(batch), lengths - 1]
        rows = torch.arange(batch, dtype=torch.int64)
        group = DecodeGroup(0, batch, span, valid.view(batch, 1, 1, span), None, 0)
        every = tuple(range(batch))  # one decode row per sequence, in order
        return ForwardBatch(tuple(padded), torch.tensor([s.token_ids[0] for s in padded], dtype=torch.int64),
                            lengths - 1, write, rows, prefills=(), decode_groups=(group,), seq_rows=every,
                            prefill_seqs=(), decode_seqs=every, max_position=span - 1,
                            decode_gather_slots=gather.reshape(-1))

    def run(self, inputs: Sequence[SequenceInput]) -> torch.Tensor:
        """Logits [len(inputs), vocab] of a decode-only step (see ``fits``)."""
        assert self._within_keys(inputs), "DecodeGraphRunner.run on a step outside its keys"
        batch, span = self.key(inputs)
        host = self._host_batch(inputs, batch, span)
        cap = self._graphs.get((batch, span))
        if cap is None:
            cap = self._capture(host)
            self._graphs[(batch, span)] = cap
        st = cap.batch
        for dst, src in ((st.input_ids, host.input_ids), (st.positions, host.positions),
                         (st.write_slots, host.write_slots), (st.decode_gather_slots, host.decode_gather_slots),
                         (st.decode_groups[0].length_mask, host.decode_groups[0].length_mask)):
            assert dst is not None and src is not None
            dst.copy_(src, non_blocking=True)
        if cap.graph is None:
            out = self.model.forward(st, self.arena)
        else:
            cap.graph.replay()
            out = cap.output
            self.replays += 1
        assert out is not None
        return out[:len(inputs)]

    def _capture(self, host: ForwardBatch) -> _Captured:
        dev = self.device
        g = host.decode_groups[0]
        assert host.decode_gather_slots is not None and g.length_mask is not None
        group = DecodeGroup(0, g.num_seqs, g.span_tokens, g.length_mask.to(dev), None, 0)
        static = ForwardBatch(host.seqs, host.input_ids.to(dev), host.positions.to(dev), host.write_slots.to(dev),
                              host.last_token_rows.to(dev), prefills=(), decode_groups=(group,),
                              seq_rows=host.seq_rows, prefill_seqs=(), decode_seqs=host.decode_seqs,
                              max_position=host.max_position, decode_gather_slots=host.decode_gather_slots.to(dev))
        # Grow the rotary tables before capture: growing inside a graph would allocate.
        self.model.rotary.lookup(static.positions, static.max_position)
        graph = self.backend.new_graph(self._pool_owner) if self.use_graphs else None
        if graph is None:
            return _Captured(static, None, None)
        out = graph.capture(lambda: self.model.forward(static, self.arena))
        if self._pool_owner is None:
            self._pool_owner = graph
        return _Captured(static, graph, out)

    @property
    def num_graphs(self) -> int:
        return sum(1 for c in self._graphs.values() if c.graph is not None)
