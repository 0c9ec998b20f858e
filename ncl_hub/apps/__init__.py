"""Applications: the logic behind the recipes that use a trained model (``recipes/evaluate.py``,
``recipes/predict.py``), above every other layer of the library (they start Accelerate, build data and load
models)."""
from .evaluate import EvaluateOptions, evaluate_run
from .predict import PredictOptions, predict_images

__all__ = ["EvaluateOptions", "PredictOptions", "evaluate_run", "predict_images"]
