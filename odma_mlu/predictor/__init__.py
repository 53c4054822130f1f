"""Generation-length prediction: the interface, predictors, calibration, online histograms."""

from odma_mlu.predictor.base import QUANTILES, LengthPrediction, LengthPredictor, RequestFeatures

__all__ = ["QUANTILES", "LengthPrediction", "LengthPredictor", "RequestFeatures"]
