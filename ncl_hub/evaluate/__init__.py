"""Long-tailed evaluation of NCL models: ``metrics`` (the numbers the field reports, from logits), ``report``
(markdown summary, shifted-prior table, plots, metrics.json) and ``run`` (a model over evaluation splits; the logic
of ``recipes/evaluate.py``)."""
from .metrics import GROUPS, VALIDATION_SPLITS, evaluate_predictions, group_classes, split_metrics
from .report import format_prior_shift, format_summary, load_metrics, write_report
from .run import EvaluateOptions, evaluate_run, predict, record_absent_classes

__all__ = [
    "EvaluateOptions", "GROUPS", "VALIDATION_SPLITS", "evaluate_predictions", "evaluate_run", "format_prior_shift",
    "format_summary", "group_classes", "load_metrics", "predict", "record_absent_classes", "split_metrics",
    "write_report",
]
