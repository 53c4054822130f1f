"""Decode steps from captured graphs (engine/graph_runner.py).

On CPU the runner's padded static path runs eagerly (``decode_graphs=True`` on a backend
without graphs): greedy output must stay token-identical to transformers. On CUDA the same
path is captured with ``torch.cuda.CUDAGraph`` and replayed (skipped without a GPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from odma_mlu.config import CacheConfig, SchedulerConfig
from odma_mlu.engine.graph_runner import GRAPH_BATCH_SIZES, DecodeGraphRunner
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from test_engine import MAX_NEW, PROMPTS, ConstantPredictor, reference  # noqa: F401 - the fixture


def _engine(model_dir: Path, policy: str, capacity: int, backend: str = "cpu", dtype: str | None = None,
            **kw: object) -> LLMEngine:
    return LLMEngine(model_dir, kv_policy=policy, backend=backend, dtype=dtype, kv_capacity_tokens=capacity,
                     predictor=ConstantPredictor(2), decode_graphs=True,
                     cache=CacheConfig(page_size_tokens=4),
                     scheduler=replace(SchedulerConfig(), max_new_tokens=MAX_NEW, **kw))  # type: ignore[arg-type]


def test_graphs_are_off_by_default_on_cpu(tiny_model_dir: Path) -> None:
    eng = LLMEngine(tiny_model_dir, kv_policy="paged", backend="cpu", kv_capacity_tokens=256)
    assert eng.runner is None


@pytest.mark.parametrize("policy", ["static", "odma", "paged", "ideal"])
def test_padded_static_decode_matches_transformers(tiny_model_dir: Path, reference: list[list[int]],
                                                   policy: str) -> None:
    eng = _engine(tiny_model_dir, policy, capacity=96, enable_chunked_prefill=True, max_prefill_chunk_tokens=5)
    assert eng.runner is not None and not eng.runner.use_graphs
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    assert [list(o.token_ids) for o in outs] == reference
    assert len(eng.runner._graphs) > 0, "no decode step went through the runner"
    assert eng.policy.reserved_tokens() == 0


def test_graph_keys_pad_batch_and_span() -> None:
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import SequenceInput

    seqs = [SequenceInput((5,), n - 1, KVLocation(((100 * i, 128),))) for i, n in enumerate((3, 70, 9))]
    assert DecodeGraphRunner.key(seqs) == (4, 128)
    assert GRAPH_BATCH_SIZES[0] == 1 and list(GRAPH_BATCH_SIZES) == sorted(GRAPH_BATCH_SIZES)


def _decodes(contexts: list[int]) -> list:
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import SequenceInput

    out, start = [], 0
    for n in contexts:  # one run each, 16 slots apart
        out.append(SequenceInput((5,), n - 1, KVLocation(((start, n + 8),))))
        start += n + 24
    return out


def test_graph_is_priced_against_the_eager_groups() -> None:
    """On the MLU370-X4 profile (7B shape) a batch of like contexts replays from its graph:
    the padding is small and ~1,000 launches are saved. One long context among short ones
    pads every row to its span class, and the bytes cost more than the launches."""
    from emulator.cost_model import CostModel
    from emulator.profile import load_profile
    from odma_mlu.config import load_model_spec
    from odma_mlu.engine.graph_runner import graph_pays

    cost = CostModel(load_profile("mlu370-x4"), load_model_spec("deepseek-r1-distill-qwen-7b", dtype="float16"))
    assert graph_pays(cost, _decodes([1000] * 16))
    assert not graph_pays(cost, _decodes([100] * 15 + [7000]))
    # the price: the extra padded slots against the launches folded into one
    from odma_mlu.engine.step_work import StepWork

    work = StepWork.build((), [(1000,)] * 16)
    saved_s = (cost.num_kernels(work) - 1) * cost.profile.launch_overhead_s
    per_slot_s = cost.model.num_layers * (2 * cost.model.kv_bytes_per_token_per_layer
                                          / cost.profile.stream_bandwidth_bytes_per_s
                                          + 4.0 * cost.model.num_heads * cost.model.head_dim / cost.matmul_rate(1))
    most = int(saved_s / per_slot_s)  # padded slots the launches pay for
    assert cost.graph_pays(work, 16, (16000 + most - 1) // 16)
    assert not cost.graph_pays(work, 16, (16000 + most + 16) // 16)


class _Alternating:
    """A pricer that sends every other decode-only step to the graph, the rest eager."""

    def __init__(self) -> None:
        self.calls = 0

    def graph_pays(self, eager: object, batch_pad: int, span_tokens: int) -> bool:
        self.calls += 1
        return self.calls % 2 == 1


def test_steps_priced_off_the_graph_run_eagerly_with_the_same_tokens(tiny_model_dir: Path,
                                                                    reference: list[list[int]]) -> None:
    eng = _engine(tiny_model_dir, "odma", capacity=96, enable_chunked_prefill=True, max_prefill_chunk_tokens=5)
    assert eng.runner is not None and eng.runner.pricer is None  # no profile: every step that fits
    eng.runner.pricer = _Alternating()
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    assert [list(o.token_ids) for o in outs] == reference
    assert eng.runner.eager_by_price > 0 and len(eng.runner._graphs) > 0


def test_engine_prices_graphs_with_its_profile(tiny_model_dir: Path) -> None:
    eng = LLMEngine(tiny_model_dir, kv_policy="paged", backend="cpu", kv_capacity_tokens=256, decode_graphs=True,
                    profile="cpu-host")
    assert eng.runner is not None and eng.runner.pricer is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager(tiny_model_dir: Path) -> None:
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    eager = LLMEngine(tiny_model_dir, kv_policy="paged", backend="cuda", kv_capacity_tokens=2048, decode_graphs=False)
    graphs = _engine(tiny_model_dir, "paged", capacity=2048, backend="cuda")
    assert graphs.runner is not None and graphs.runner.use_graphs
    want = [list(o.token_ids) for o in eager.generate(PROMPTS, params)]
    got = [list(o.token_ids) for o in graphs.generate(PROMPTS, params)]
    assert got == want
    assert graphs.runner.num_graphs > 0 and graphs.runner.replays > 0
