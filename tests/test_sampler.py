"""Sampling modes, per-request reproducibility, stop conditions and parameter validation."""

from __future__ import annotations

import pytest
import torch

from odma_mlu.engine.sampler import FINISH_LENGTH, FINISH_STOP, Sampler, SamplingParams, check_stop
from odma_mlu.errors import RequestRejected

VOCAB = 50


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = _logits(6)
    sampler = Sampler()
    greedy = [SamplingParams()] * 6
    assert sampler.sample(logits, greedy, [None] * 6) == logits.argmax(-1).tolist()
    top1 = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(6)]
    gens = [sampler.make_generator(p) for p in top1]
    assert sampler.sample(logits, top1, gens) == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_regardless_of_batch():
    """The same request (seed 7) draws the same tokens alone and batched with strangers."""
    sampler = Sampler()
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=7)
    steps = [_logits(4, seed=s) for s in range(20)]

    alone_gen = sampler.make_generator(params)
    alone = [sampler.sample(step[2:3], [params], [alone_gen])[0] for step in steps]

    others = [SamplingParams(temperature=0.7, seed=1), SamplingParams(), SamplingParams(temperature=2.0)]
    batch_params = [others[0], others[1], params, others[2]]
    gens = [sampler.make_generator(others[0]), None, sampler.make_generator(params), sampler.make_generator(others[2])]
    batched = [sampler.sample(step, batch_params, gens)[2] for step in steps]
    assert batched == alone
    assert len(set(alone)) > 3, "temperature 1 over random logits should not be constant"

    # A different seed gives a different stream.
    other = sampler.make_generator(SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=8))
    assert [sampler.sample(step[2:3], [params], [other])[0] for step in steps] != alone


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * (VOCAB - 3)]))
    params = SamplingParams(temperature=1.0, seed=0)
    sampler = Sampler()
    gen = sampler.make_generator(params)
    draws = torch.tensor([sampler.sample(logits, [params], [gen])[0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=VOCAB)[:3].float() / 3000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04, rtol=0)


def test_top_p_and_top_k_mask_the_tail():
    probs = torch.tensor([[0.45, 0.30, 0.15, 0.06, 0.04] + [0.0] * (VOCAB - 5)])
    logits = torch.log(probs.clamp_min(1e-12))
    sampler = Sampler()
    for params, allowed in ((SamplingParams(temperature=1.0, top_p=0.7, seed=0), {0, 1}),
                            (SamplingParams(temperature=1.0, top_p=0.76, seed=0), {0, 1, 2}),
                            (SamplingParams(temperature=1.0, top_p=0.01, seed=0), {0}),
                            (SamplingParams(temperature=5.0, top_k=2, seed=0), {0, 1})):
        gen = sampler.make_generator(params)
        seen = {sampler.sample(logits, [params], [gen])[0] for _ in range(300)}
        assert seen == allowed, (params, seen)


def test_stop_token_ids_eos_and_max_new_tokens():
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(9,))
    assert check_stop(params, [1, 2]) is None
    assert check_stop(params, [1, 9]).finish_reason == FINISH_STOP
    assert check_stop(params, [1, 9]).matched == 9
    assert check_stop(params, [1, 5], eos_token_ids=(5,)).finish_reason == FINISH_STOP
    assert check_stop(SamplingParams(ignore_eos=True), [1, 5], eos_token_ids=(5,)) is None
    assert check_stop(params, [1, 2, 3, 4]).finish_reason == FINISH_LENGTH
    # A stop token on the last allowed step is a stop, not a length finish.
    assert check_stop(params, [1, 2, 3, 9]).finish_reason == FINISH_STOP


def test_stop_strings_cut_the_text():
    params = SamplingParams(stop=("END", "\n\n"), max_new_tokens=100)
    assert check_stop(params, [1, 2], "hello wor") is None
    decision = check_stop(params, [1, 2, 3], "hello world\n\nmore")
    assert decision.finish_reason == FINISH_STOP and decision.text_end == 11 and decision.matched == "\n\n"
    # The stop string straddles the already-checked prefix and the new text.
    decision = check_stop(params, [1, 2, 3], "abc EN" + "D tail", text_checked_chars=6)
    assert decision.text_end == 4 and decision.matched == "END"
    # Earliest match wins among several stop strings.
    assert check_stop(params, [1], "x END y\n\n").matched == "END"


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
    ({"stop_token_ids": (-3,)}, "stop_token_ids must be non-negative"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(RequestRejected, match=message):
        SamplingParams(**kwargs)


def test_params_freeze_lists():
    params = SamplingParams(stop=["a"], stop_token_ids=[3])  # type: ignore[arg-type]
    assert params.stop == ("a",) and params.stop_token_ids == (3,)
    hash(params)
