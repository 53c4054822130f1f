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
