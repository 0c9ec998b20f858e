"""Long-tailed subsets and balanced validation splits of ``datasets`` objects, from their label column alone.

Nothing here decodes an image: labels are read from the Arrow ``label`` column, and subsets are taken with
``Dataset.select`` (an index mapping, no copy), so building CIFAR-LT from 50,000 images or an iNaturalist list of
437,513 paths costs milliseconds. Long-tailed subsets follow Cui et al. (CVPR 2019): class i of C keeps
``n_i = floor(n_max * IF^(-i / (C - 1)))`` images, class 0 the head.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import pyarrow as pa
import torch

from ..labels import as_label_array, check_labels

__all__ = [
    "class_counts", "is_balanced", "label_array", "long_tailed_counts", "long_tailed_split", "make_long_tailed",
    "prepare_long_tailed", "rank_within_class", "split_validation", "PROFILES",
]

_logger = logging.getLogger(__name__)

PROFILES = ("exp", "step")

Labels = Union["datasets.Dataset", np.ndarray, torch.Tensor, Sequence[int]]


def label_array(dataset: datasets.Dataset, column: str = "label") -> np.ndarray:
    """The label column as an int64 array [N], read from Arrow (respecting any ``select`` mapping), no decoding."""
    if column not in dataset.column_names:
        raise ValueError(f"dataset has no {column!r} column: columns found: {dataset.column_names}")
    col = dataset.with_format("arrow", columns=[column])[column]
    if not pa.types.is_integer(col.type):
        raise ValueError(
            f"labels in column {column!r} are {col.type}, not integer class indices. Encode them first, e.g. "
            f"dataset.class_encode_column({column!r}), or name an integer column with label_column=..."
        )
    if col.null_count:
        raise ValueError(f"column {column!r} has {col.null_count} missing labels; drop or fill those rows first")
    return col.to_numpy().astype(np.int64, copy=False)


def _aslabel_array(labels: Labels) -> np.ndarray:
    if hasattr(labels, "column_names"):  # a datasets.Dataset
        return label_array(labels)
    return as_label_array(labels)


def _num_classes(dataset: datasets.Dataset, labels: np.ndarray) -> int:
    feature = dataset.features.get("label")
    if getattr(feature, "names", None) is not None:  # a ClassLabel
        return feature.num_classes
    return int(labels.max()) + 1 if labels.size else 0


def _class_name(dataset: datasets.Dataset, c: int) -> str:
    feature = dataset.features.get("label")
    if getattr(feature, "names", None) is not None and feature.names[c] != str(c):
        return f"class {c} ({feature.names[c]!r})"
    return f"class {c}"


def class_counts(dataset_or_labels: Labels, num_classes: int) -> List[int]:
    """Number of images per class [C], counted from the labels actually present.

    Args:
        dataset_or_labels: a ``datasets.Dataset`` with a ``label`` column (only that column is read,
            no image is decoded), or integer labels [N] as a list, array or tensor.
        num_classes: C; classes without images count 0.

    Returns:
        A list of C ints.
    """
    labels = _aslabel_array(dataset_or_labels)
    check_labels(labels, num_classes)
    return np.bincount(labels, minlength=num_classes).tolist()


def is_balanced(counts: Sequence[int], tolerance: float = 0.1) -> bool:
    """True when max(counts) / min(counts) <= 1 + tolerance (a class with 0 images makes it unbalanced)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size == 0:
        raise ValueError("is_balanced needs at least one class count")
    if counts.min() <= 0:
        return False
    return bool(counts.max() / counts.min() <= 1.0 + tolerance)


def long_tailed_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp") -> List[int]:
    """Per-class image counts of a long-tailed subset, head first.

    Args:
        n_max: images of the head class (class 0).
        num_classes: C.
        imbalance_factor: IF = n_max / n_min, >= 1 (1 gives balanced counts).
        profile: ``"exp"``: n_i = floor(n_max * IF^(-i / (C - 1))) (Cui et al. 2019; CIFAR-10 n_max 5000 IF 100
            gives 12,406 images); ``"step"``: the first C // 2 classes n_max, the rest floor(n_max / IF).

    Returns:
        A list of C ints, non-increasing.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown long-tail profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    if not (isinstance(imbalance_factor, (int, float)) and math.isfinite(imbalance_factor)) or imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be a finite number >= 1 (n_max / n_min), got {imbalance_factor!r}")
    if num_classes < 1 or n_max < 1:
        raise ValueError(f"need num_classes >= 1 and n_max >= 1, got {num_classes} and {n_max}")
    if num_classes == 1:
        return [int(n_max)]
    if profile == "step":
        tail = int(n_max / imbalance_factor)
        return [int(n_max)] * (num_classes // 2) + [tail] * (num_classes - num_classes // 2)
    # written as in Cui et al.'s generator, n_max * (1/IF)^(i/(C-1)) truncated, so the totals match theirs exactly
    ratio = 1.0 / float(imbalance_factor)
    return [int(n_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def rank_within_class(labels: np.ndarray, num_classes: int, seed: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Group indices by class in a seeded random order (dataset order if seed is None).

    Returns ``(by_class, rank)``: dataset indices [N] grouped by class, and the position [N] of each one within
    its class in that order. Keeping ``rank < k[label]`` takes a uniformly random k-subset of every class at once.
    """
    n = labels.shape[0]
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    by_class = order[np.argsort(labels[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]])
    rank = np.arange(n) - starts[labels[by_class]]
    return by_class, rank


def _long_tailed_plan(
        dataset: datasets.Dataset, imbalance_factor: float, profile: str, seed: Optional[int],
        class_order: Optional[Sequence[int]], n_max: Optional[int],
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared by ``make_long_tailed`` and ``long_tailed_split``: ``(labels, by_class, rank, keep)`` where the
    images of class c with ``rank < keep[c]`` (in the seeded order ``by_class``) form the long-tailed subset."""
    labels = label_array(dataset)
    num_classes = _num_classes(dataset, labels)
    if class_order is None:
        order = np.arange(num_classes)
    else:
        order = np.asarray(class_order, dtype=np.int64)
        if order.shape != (num_classes,) or not np.array_equal(np.sort(order), np.arange(num_classes)):
            raise ValueError(f"class_order must be a permutation of the {num_classes} class ids 0..{num_classes - 1}")
    available = np.bincount(labels, minlength=num_classes)
    if n_max is not None and n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    largest = int(available.max()) if available.size else 0
    if largest == 0:
        raise ValueError("cannot make an empty dataset long-tailed")
    head = largest if n_max is None else int(n_max)
    target = np.empty(num_classes, dtype=np.int64)
    target[order] = long_tailed_counts(head, num_classes, imbalance_factor, profile)
    keep = np.minimum(target, available)
    empty = np.flatnonzero(keep == 0)
    if empty.size:
        c = int(empty[0])
        raise ValueError(
            f"{_class_name(dataset, c)} would keep 0 images (it has {int(available[c])}, its long-tail target is "
            f"{int(target[c])} with n_max={head}, imbalance_factor={imbalance_factor}, profile={profile!r}). "
            "Use a smaller imbalance_factor, or drop the class from the label set."
        )
    short = np.flatnonzero(target > available)
    if short.size:
        _logger.info("%d classes have fewer images than their long-tail target and keep all they have: %s",
                     short.size, ", ".join(f"{_class_name(dataset, int(c))} {available[c]}/{target[c]}"
                                           for c in short[:5]))
    by_class, rank = rank_within_class(labels, num_classes, seed)
    return labels, by_class, rank, keep


def make_long_tailed(
        dataset: datasets.Dataset,
        imbalance_factor: float,
        profile: str = "exp",
        seed: Optional[int] = 0,
        class_order: Optional[Sequence[int]] = None,
        n_max: Optional[int] = None,
) -> datasets.Dataset:
    """A long-tailed subset of ``dataset`` (no image is decoded: ``Dataset.select`` over the label column).

    The class at position i of ``class_order`` keeps ``long_tailed_counts(n_max, C, imbalance_factor, profile)[i]``
    images. A class with fewer images than its target keeps all it has.

    Args:
        dataset: a dataset with a ``label`` column.
        imbalance_factor: IF = n_max / n_min, >= 1.
        profile: ``"exp"`` or ``"step"``, see ``long_tailed_counts``.
        seed: which images each class keeps: a seeded uniform choice; None keeps the first n_i in dataset
            order, as Cui et al.
        class_order: a permutation of the C class ids, head first (default: label order, class 0 the head).
        n_max: images of the head class (default: the largest class size, as the CIFAR-LT benchmarks).

    Returns:
        The subset, rows in their original order.
    """
    labels, by_class, rank, keep = _long_tailed_plan(dataset, imbalance_factor, profile, seed, class_order, n_max)
    return dataset.select(np.sort(by_class[rank < keep[labels[by_class]]]))


def long_tailed_split(
        dataset: datasets.Dataset,
        imbalance_factor: float,
        val_per_class: int,
        profile: str = "exp",
        seed: Optional[int] = 0,
        class_order: Optional[Sequence[int]] = None,
        n_max: Optional[int] = None,
) -> Tuple[datasets.Dataset, datasets.Dataset, List[int]]:
    """The benchmark's long-tailed training set, and a balanced validation set from the images it leaves out.

    The training set is exactly ``make_long_tailed(dataset, ...)`` (CIFAR-10-LT IF 100: 12,406 images, 5,000 down
    to 50), so nothing is taken from the rare classes for validation. Class c gives
    ``min(val_per_class, images of c the subsampling discards)`` validation images, chosen in the same seeded
    order after the kept ones: disjoint from training by construction. A class that keeps all its images (the
    head class when n_max is the largest class size) has none to give; the returned shortfall names it.

    Args:
        dataset: a balanced training split with a ``label`` column.
        imbalance_factor, profile, seed, class_order, n_max: as ``make_long_tailed``.
        val_per_class: validation images wanted per class (>= 0).

    Returns:
        ``(train, val, val_counts)``: disjoint subsets, rows in their original order, and the validation images
        of each class [C].
    """
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    labels, by_class, rank, keep = _long_tailed_plan(dataset, imbalance_factor, profile, seed, class_order, n_max)
    k = keep[labels[by_class]]
    is_val = (rank >= k) & (rank < k + val_per_class)
    val_counts = np.bincount(labels[by_class[is_val]], minlength=keep.size).tolist()
    return (dataset.select(np.sort(by_class[rank < k])), dataset.select(np.sort(by_class[is_val])), val_counts)


def prepare_long_tailed(
        dataset: datasets.Dataset, imbalance_factor: Optional[float], **kwargs,
) -> datasets.Dataset:
    """Make a balanced training split long-tailed; use an already long-tailed one as it is.

    Args:
        dataset: the training split.
        imbalance_factor: IF for ``make_long_tailed``; None uses the dataset as it is.
        **kwargs: ``profile``, ``seed``, ``class_order`` for ``make_long_tailed``.

    Returns:
        ``make_long_tailed(dataset, imbalance_factor, **kwargs)`` if the class counts are balanced
        (``is_balanced``), else ``dataset`` unchanged.
    """
    if imbalance_factor is None:
        return dataset
    labels = label_array(dataset)
    counts = np.bincount(labels, minlength=_num_classes(dataset, labels))
    if not is_balanced(counts):
        _logger.info(
            "training split is already long-tailed (max/min class size %d/%d): using it as it is, "
            "imbalance_factor=%s ignored", counts.max(), counts.min(), imbalance_factor)
        return dataset
    return make_long_tailed(dataset, imbalance_factor, **kwargs)


def split_validation(
        dataset: datasets.Dataset, per_class: int = 20, seed: int = 0,
) -> Tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a balanced validation split from training data (for checkpoint and expert selection).

    Class c gives ``min(per_class, n_c // 2)`` images to validation, chosen with ``seed``, so every class keeps
    at least half its images for training.

    Args:
        dataset: the training split (never the test split).
        per_class: validation images per class; 0 gives an empty validation dataset with the same features.
        seed: seed of the choice.

    Returns:
        ``(train, val)``: disjoint subsets of ``dataset``, rows in their original order.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    labels = label_array(dataset)
    num_classes = _num_classes(dataset, labels)
    n_val = np.minimum(per_class, np.bincount(labels, minlength=num_classes) // 2)
    by_class, rank = rank_within_class(labels, num_classes, seed)
    is_val = rank < n_val[labels[by_class]]
    return dataset.select(np.sort(by_class[~is_val])), dataset.select(np.sort(by_class[is_val]))
