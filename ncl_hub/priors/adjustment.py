"""Class priors for deployment: checking them, long-tailed test priors, and logit adjustment.

NCL is trained with Balanced Softmax, so its logits estimate the posterior under a balanced class prior. When the
test (deployment) prior is ``pi``, the Bayes-optimal prediction is ``argmax_c z_c + log pi_c`` (Menon et al., ICLR
2021, logit adjustment); ``tau * log(pi)`` with a strength ``tau`` interpolates between the balanced model
(``tau = 0``) and that adjustment (``tau = 1``). Everything stays in log space: a class with prior 0 gets an
adjustment of ``-inf`` and is never predicted.

The test priors of the shifted-prior evaluation follow SADE (Zhang et al., NeurIPS 2022): over the classes in the
training split's order (most training images first), ``pi_i`` proportional to ``r ** (-i / (C - 1))`` for a test
imbalance ``r``. ``r > 1`` is a forward long tail (the head is ``r`` times as frequent as the tail), ``r < 1`` a
backward one (the tail becomes the head) and ``r = 1`` is uniform.

Shapes: C classes.
"""
from __future__ import annotations

import math
import os
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch



__all__ = [
    "TEST_IMBALANCES", "PriorSpec", "check_prior", "check_prior_strength", "resolve_prior", "logit_adjustment",
    "training_order", "long_tailed_prior", "format_imbalance", "describe_prior", "load_prior_file",
]

# forward 50 ... 2, uniform, backward 1/2 ... 1/50 (SADE's test-agnostic protocol)
TEST_IMBALANCES = (50.0, 25.0, 10.0, 5.0, 2.0, 1.0, 1 / 2, 1 / 5, 1 / 10, 1 / 25, 1 / 50)
PRIOR_NAMES = ("train", "uniform")

PriorSpec = Union[None, str, os.PathLike, Sequence[float], torch.Tensor, Mapping[str, Any]]


def check_prior(prior: Union[Sequence[float], torch.Tensor], num_classes: int, what: str = "class_prior"
                ) -> torch.Tensor:
    """Validate a class prior and normalise it to sum 1.

    Args:
        prior: C non-negative finite numbers (counts or probabilities; zeros allowed, not all zero).
        num_classes: C.
        what: the name used in error messages.

    Returns:
        the prior [C], float64, summing to 1.

    Raises:
        ValueError: not a flat sequence of numbers, the wrong length, a negative or non-finite value, or all zeros.
    """
    try:
        values = torch.as_tensor(prior, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} must be a sequence of {num_classes} numbers, got {prior!r}") from e
    if values.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of {num_classes} numbers, got shape {tuple(values.shape)}")
    if values.numel() != num_classes:
        raise ValueError(f"{what} has {values.numel()} entries but the model has {num_classes} classes")
    bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
    if bad:
        raise ValueError(f"{what} has non-finite values (inf or nan) at classes {bad[:10]}")
    bad = torch.nonzero(values < 0).flatten().tolist()
    if bad:
        raise ValueError(f"{what} has negative values at classes {bad[:10]} (e.g. {values[bad[0]].item():g}); "
                         f"a prior is C non-negative numbers")
    total = values.sum()
    if not total > 0:
        raise ValueError(f"{what} is all zeros: at least one class needs a positive prior")
    return values / total


def check_prior_strength(strength: float) -> float:
    """``tau`` as a float; raises ValueError unless it is a finite number >= 0."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"prior_strength must be a finite number >= 0, got {strength!r}")
    return float(strength)


def resolve_prior(prior: PriorSpec, num_classes: int, class_counts: Optional[Sequence[float]] = None, *,
                  class_names: Optional[Sequence[str]] = None) -> Optional[torch.Tensor]:
    """A prior specification as a normalised prior [C] (float64), or None for the balanced model.

    Args:
        prior: None (balanced), ``"uniform"`` (the same: a uniform prior shifts every logit by one constant, so
            it changes no prediction and no probability), ``"train"`` (the training class frequencies,
            ``class_counts``), C non-negative numbers, a mapping with them under ``"prior"`` (and optionally their
            ``"class_names"``), or the path of a file of them (:func:`load_prior_file`).
        num_classes: C.
        class_counts: training images per class [C], needed for ``"train"``.
        class_names: the model's C class names: a prior that names its classes must name the same, in order.
    """
    if prior is None:
        return None
    if isinstance(prior, (str, os.PathLike)):
        if prior == "uniform":
            return None
        if prior == "train":
            if class_counts is None:
                raise ValueError("class_prior='train' needs the training class counts, and none are known: pass "
                                 "class_counts=[...] (an export made by ncl_hub stores them in config.json)")
            return check_prior(class_counts, num_classes, "class_counts (for class_prior='train')")
        if not os.path.isfile(prior):
            raise ValueError(f"unknown class_prior {str(prior)!r}; choose one of {PRIOR_NAMES}, None, "
                             f"{num_classes} numbers, or a file of them")
        prior = load_prior_file(prior, class_names=class_names)
    if isinstance(prior, Mapping):
        prior = _prior_of_mapping(prior, class_names)
    return check_prior(prior, num_classes)


def _prior_of_mapping(record: Mapping[str, Any], class_names: Optional[Sequence[str]], where: str = "class prior"
                      ) -> List[float]:
    """The ``"prior"`` numbers of a prior record (as ``recipes/predict.py --class-prior estimate`` writes it),
    checked against the model's class names when the record names its classes."""
    if "prior" not in record:
        raise ValueError(f"{where} is a mapping without a 'prior' list (keys: {sorted(record)[:8]})")
    names = record.get("class_names")
    if names is not None and class_names is not None and [str(n) for n in names] != [str(n) for n in class_names]:
        raise ValueError(f"{where} is for the classes {list(names)[:5]}..., the model's are "
                         f"{list(class_names)[:5]}...: a prior is only valid for the classes, in the order, it was "
                         "made for")
    return record["prior"]


def logit_adjustment(prior: Optional[torch.Tensor], strength: float) -> Optional[torch.Tensor]:
    """``tau * log(pi)`` [C] (float64; ``-inf`` where ``pi`` is 0), or None when nothing is added.

    Args:
        prior: a normalised prior [C] (see :func:`check_prior`), or None.
        strength: ``tau >= 0``; 0 means no adjustment (also for classes with prior 0).
    """
    strength = check_prior_strength(strength)
    if prior is None or strength == 0:
        return None
    log_prior = prior.double().log()  # log(0) = -inf
    return torch.where(torch.isinf(log_prior), log_prior, strength * log_prior)


def training_order(class_counts: Sequence[float]) -> List[int]:
    """Class ids from the most to the fewest training images (ties by class id): the long tail's order."""
    counts = [float(c) for c in class_counts]
    return sorted(range(len(counts)), key=lambda c: (-counts[c], c))


def long_tailed_prior(class_counts: Sequence[float], imbalance: float) -> torch.Tensor:
    """The test prior of test imbalance ``r`` over the training order: ``pi`` [C] (float64, sums to 1).

    The class of rank i (0 = most training images) gets weight ``r ** (-i / (C - 1))``: the head class is ``r``
    times as frequent as the tail class, with an exponential profile in between (the usual long-tail profile).
    ``r < 1`` reverses it; ``r = 1`` (or C = 1) is uniform.
    """
    if not (isinstance(imbalance, (int, float)) and math.isfinite(imbalance) and imbalance > 0):
        raise ValueError(f"test imbalance must be a finite number > 0, got {imbalance!r}")
    order = training_order(class_counts)
    num_classes = len(order)
    if num_classes == 0:
        raise ValueError("class_counts is empty")
    ranks = torch.empty(num_classes, dtype=torch.float64)
    ranks[torch.tensor(order)] = torch.arange(num_classes, dtype=torch.float64)
    exponent = -ranks / max(1, num_classes - 1)
    weights = torch.exp(exponent * math.log(imbalance))
    return weights / weights.sum()


def format_imbalance(imbalance: float) -> str:
    """``50``, ``1``, ``1/50``: how a test imbalance reads in tables."""
    if imbalance >= 1:
        return f"{imbalance:g}"
    inverse = 1 / imbalance
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{imbalance:g}"


def describe_prior(class_prior: Union[None, str, Sequence[float]], strength: Optional[float]) -> Optional[str]:
    """A stored class prior (``"train"``, C normalised numbers, or None) in words, for reports and cards."""
    if class_prior is None:
        return None
    tau = "" if strength is None else f", strength tau = {strength:g}"
    if isinstance(class_prior, str):
        what = "the training class frequencies" if class_prior == "train" else repr(class_prior)
        return f"{what} (class_prior={class_prior!r}{tau})"
    values = [float(v) for v in class_prior]
    zeros = sum(v == 0 for v in values)
    ratio = max(values) / min(v for v in values if v > 0)
    text = f"a custom prior over {len(values)} classes (largest / smallest non-zero {ratio:.3g}"
    return text + (f", {zeros} class(es) at 0: never predicted" if zeros else "") + f"{tau})"


def load_prior_file(path: Union[str, os.PathLike], class_names: Optional[Sequence[str]] = None) -> List[float]:
    """Read a class prior from a file: a JSON list of C numbers, a JSON object with them under ``"prior"`` (what
    ``recipes/predict.py --class-prior estimate`` writes; its ``"class_names"``, when present, must be
    ``class_names``), or text with C numbers separated by spaces, commas or new lines (``#`` starts a comment).
    Raises ValueError naming the file when it holds anything else."""
    import json
    import re
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class prior file {str(path)!r} does not exist (expected 'train', 'uniform' or a file)")
    text = path.read_text(encoding="utf-8")
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"class prior file {str(path)!r} is not valid JSON: {e}") from e
        if isinstance(values, dict):
            values = _prior_of_mapping(values, class_names, f"class prior file {str(path)!r}")
    else:
        tokens = [t for line in text.splitlines() for t in re.split(r"[\s,]+", line.split("#", 1)[0]) if t]
        try:
            values = [float(t) for t in tokens]
        except ValueError as e:
            raise ValueError(f"class prior file {str(path)!r} must hold numbers only: {e}") from e
    if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"class prior file {str(path)!r} must hold a non-empty list of numbers")
    return [float(v) for v in values]


