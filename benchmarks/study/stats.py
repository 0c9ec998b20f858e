"""A number over seeds: its mean and sample standard deviation, and how a table cell or a sentence shows it. The
training and deployment records and their pages share these two helpers (package-internal, hence the underscores)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional


def _stats(values: List[Optional[float]]) -> Dict[str, Any]:
    """``{"mean", "std" (sample, 0 for one value), "n" (values that are not None), "values" (as given)}``."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": values}


def _fmt(stat: Optional[Dict[str, Any]], with_values: bool = True, signed: bool = False, digits: int = 2) -> str:
    """``mean ± std (each value)`` of a :func:`_stats` dict with ``digits`` decimals (the values with one fewer)."""
    if not stat or stat["mean"] is None:
        return "n/a"
    sign = "+" if signed else ""
    if stat["n"] == 1:  # no spread to show: say so rather than print "± 0.00"
        return f"{stat['mean']:{sign}.{digits}f} (1 seed)"
    text = f"{stat['mean']:{sign}.{digits}f} ± {stat['std']:.{digits}f}"
    if with_values:
        text += " (" + ", ".join("-" if v is None else f"{v:{sign}.{max(1, digits - 1)}f}"
                                 for v in stat["values"]) + ")"
    return text
