"""The default predictor: online lengths per client and prompt band; a learned text model
only once it has proved calibrated on the traffic."""

from __future__ import annotations

from odma_mlu.predictor.auto import AutoPredictor
from odma_mlu.predictor.base import LengthPrediction, LengthPredictor, RequestFeatures
from odma_mlu.predictor.simple import PRIOR_FRACTIONS, SimplePredictor


class Fixed(LengthPredictor):
    name = "fixed"

    def __init__(self, tokens: float) -> None:
        self.tokens = tokens

    def predict(self, request: RequestFeatures) -> LengthPrediction:
        t = self.tokens
        return LengthPrediction.from_values([t, t * 1.2, t * 1.4, t * 1.6, t * 2], request.max_new_tokens)


def req(client: str | None, prompt: int = 100, text: str | None = None) -> RequestFeatures:
    return RequestFeatures(prompt, 4096, text, metadata={"client": client} if client else {})


def test_online_predictor_learns_per_client_then_falls_back() -> None:
    p = SimplePredictor(min_samples=5, min_key_samples=5)
    assert p.predict(req("a")).median == PRIOR_FRACTIONS[0] * 4096  # nothing seen yet: the prior
    for _ in range(10):
        p.observe(req("a"), 100)
        p.observe(req("b"), 3000)
    assert p.predict(req("a")).median == 100 and p.predict(req("b")).median == 3000
    # an unseen client in a seen prompt band gets that band's lengths (both clients mixed)
    assert 100 < p.predict(req("c")).median <= 3000
    # an unseen band of an unseen client: all traffic
    assert 100 <= p.predict(req("c", prompt=5000)).median <= 3000


def test_auto_uses_the_learned_model_only_once_it_is_calibrated() -> None:
    good = AutoPredictor(Fixed(100), SimplePredictor(), target_coverage=0.8, min_evidence=20)
    lengths = [60, 80, 90, 100, 125, 120, 70, 95, 105, 130]  # 80% <= 120 (the q0.8 of Fixed)
    for i in range(40):
        f = req(None, text=f"prompt {i}")
        good.predict_batch([f])
        assert good.learned_is_calibrated == (i >= 20)  # online answers until there is evidence
        good.observe(f, lengths[i % 10])
    assert good.learned_is_calibrated
    assert good.predict(req(None, text="x")).median == 100
    # requests without text always get the online answer
    assert good.predict(req(None)) == good.online.predict(req(None))

    bad = AutoPredictor(Fixed(100), SimplePredictor(), target_coverage=0.8, min_evidence=20)
    for i in range(60):  # reasoning traffic: the learned model is far too short
        f = req(None, text=f"prompt {i}")
        bad.predict_batch([f])
        bad.observe(f, 3000 + 10 * (i % 7))
    assert not bad.learned_is_calibrated
    assert bad.predict(req(None, text="y")).median >= 3000  # the online lengths answer


def test_auto_without_a_learned_model_is_the_online_predictor() -> None:
    auto = AutoPredictor(None)
    for _ in range(30):
        f = req("a", text="t")
        auto.predict_batch([f])
        auto.observe(f, 500)
    assert auto.predict(req("a", text="t")).median == 500
