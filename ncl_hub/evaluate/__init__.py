"""Long-tailed evaluation of NCL models: ``metrics`` (the numbers the field reports, from logits), ``predict`` (every
expert's logits over a DataLoader, under Accelerate) and ``report`` (markdown summary, shifted-prior table, plots,
metrics.json). Evaluating a saved run is an application: :mod:`ncl_hub.apps.evaluate`."""
from .metrics import GROUPS, evaluate_predictions, group_classes, split_metrics
from .predict import predict
from .report import format_prior_shift, format_summary, load_metrics, record_absent_classes, write_report

__all__ = [
    "GROUPS", "evaluate_predictions", "format_prior_shift", "format_summary", "group_classes", "load_metrics",
    "predict", "record_absent_classes", "split_metrics", "write_report",
]
