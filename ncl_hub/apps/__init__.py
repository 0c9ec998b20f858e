"""Applications: the logic behind the recipes that use a trained model (``recipes/evaluate.py``), above every other
layer of the library (they start Accelerate, build data and load models)."""
from .evaluate import EvaluateOptions, evaluate_run

__all__ = ["EvaluateOptions", "evaluate_run"]
