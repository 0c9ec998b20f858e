"""Checking class labels: the one validator that every reader of labels uses (losses, samplers, long-tail subsets,
dataset loading, benchmark lists), so a bad label is the same clear error wherever it is found first."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

__all__ = ["as_label_array", "check_labels"]


def _as_tensor(labels: Any) -> torch.Tensor:
    # np.array copies: Arrow-backed arrays are read-only, which torch warns about
    return labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.array(labels))


def check_labels(labels: Any, num_classes: Optional[int] = None, *, what: str = "labels") -> None:
    """Raise ValueError unless ``labels`` [N] are integer class indices in ``[0, num_classes)`` (``>= 0`` when
    ``num_classes`` is None). The message names the first bad position and value, and how many are bad.

    Args:
        labels: a 1-d tensor (checked on its own device), array or sequence; empty passes.
        num_classes: C, or None to check only that labels are non-negative.
        what: how the labels are named in the message (``"target"``, ``"split 'train' labels"``).
    """
    t = _as_tensor(labels)
    if t.numel() == 0:
        return
    if t.ndim != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-d sequence of integer class indices, got dtype {t.dtype} and shape "
                         f"{tuple(t.shape)}")
    bad = (t < 0) if num_classes is None else (t < 0) | (t >= num_classes)
    if bool(bad.any()):
        positions = torch.nonzero(bad).flatten()
        i = int(positions[0])
        valid = "class indices >= 0" if num_classes is None else f"outside [0, {num_classes})"
        message = (f"{what}[{i}] = {int(t[i])} is negative: labels must be {valid}" if num_classes is None
                   else f"{what}[{i}] = {int(t[i])} is {valid}: labels must be class indices below the number of "
                        f"classes ({num_classes})")
        raise ValueError(message + (f"; {positions.numel()} label(s) out of range" if positions.numel() > 1 else ""))


def as_label_array(labels: Any, num_classes: Optional[int] = None, *, what: str = "labels") -> np.ndarray:
    """``labels`` (a sequence, array or tensor) as an int64 array [N], checked by :func:`check_labels`."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    check_labels(arr, num_classes, what=what)
    return arr.astype(np.int64, copy=False)
