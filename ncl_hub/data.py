"""Image datasets for long-tailed training, as Hugging Face ``datasets`` objects.

Every dataset returned here has two standard columns: ``image`` (a ``datasets.Image`` feature,
decoded lazily when a row is read) and ``label`` (a ``ClassLabel``). Nothing in this module decodes
an image: labels are read from the Arrow ``label`` column only, and subsets are taken with
``Dataset.select`` (an index mapping, no copy), so building CIFAR-LT from 50,000 JPEGs or an
iNaturalist list of 437,513 paths costs milliseconds.

Sources (``load_image_dataset``): the offline ``"digits"`` demo, parquet files, ``save_to_disk``
folders, image folders and Hub dataset ids. Benchmark image lists (``load_benchmark``): ImageNet-LT,
Places-LT (OLTR split files) and iNaturalist 2018 (COCO-style JSON) over a local image root.

Long-tailed subsets follow Cui et al. (CVPR 2019): class i of C keeps
``n_i = floor(n_max * IF^(-i / (C - 1)))`` images, class 0 the head.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import pyarrow as pa
import torch

__all__ = [
    "BENCHMARKS",
    "class_counts",
    "is_balanced",
    "load_benchmark",
    "load_digits_demo",
    "load_image_dataset",
    "load_inaturalist",
    "load_split_file",
    "long_tailed_counts",
    "long_tailed_split",
    "make_long_tailed",
    "prepare_long_tailed",
    "split_validation",
]

_logger = logging.getLogger(__name__)

# Column names tried, in order, when image_column / label_column are not given (CIFAR-100 on the Hub
# has `img` and `fine_label`).
IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "fine_label")
# a source split with one of these names is returned as "val" (model selection uses it)
VAL_SPLITS = ("validation", "val", "valid")
PROFILES = ("exp", "step")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Split keywords in parquet file or folder names, as the Hub's own conventions name them.
_SPLIT_KEYWORDS = {
    "train": "train", "training": "train",
    "test": "test", "testing": "test", "eval": "test", "evaluation": "test",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
}

Labels = Union[datasets.Dataset, np.ndarray, torch.Tensor, Sequence[int]]


# ----------------------------------------------------------------------------------------------------------------
# labels and counts


def _label_array(dataset: datasets.Dataset, column: str = "label") -> np.ndarray:
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


def _as_label_array(labels: Labels) -> np.ndarray:
    if isinstance(labels, datasets.Dataset):
        return _label_array(labels)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d sequence of integer class indices, got dtype {arr.dtype} "
                         f"and shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _num_classes(dataset: datasets.Dataset, labels: np.ndarray) -> int:
    feature = dataset.features.get("label")
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return int(labels.max()) + 1 if labels.size else 0


def _class_name(dataset: datasets.Dataset, c: int) -> str:
    feature = dataset.features.get("label")
    if isinstance(feature, datasets.ClassLabel) and feature.names[c] != str(c):
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
    labels = _as_label_array(dataset_or_labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise ValueError(f"label {bad} is outside [0, {num_classes}): num_classes is too small for these labels")
    return np.bincount(labels, minlength=num_classes).tolist()


def is_balanced(counts: Sequence[int], tolerance: float = 0.1) -> bool:
    """True when max(counts) / min(counts) <= 1 + tolerance (a class with 0 images makes it unbalanced)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size == 0:
        raise ValueError("is_balanced needs at least one class count")
    if counts.min() <= 0:
        return False
    return bool(counts.max() / counts.min() <= 1.0 + tolerance)


# ----------------------------------------------------------------------------------------------------------------
# long-tailed subsets


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


def _rank_within_class(labels: np.ndarray, num_classes: int, seed: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
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
    labels = _label_array(dataset)
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
    by_class, rank = _rank_within_class(labels, num_classes, seed)
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
    labels = _label_array(dataset)
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
    labels = _label_array(dataset)
    num_classes = _num_classes(dataset, labels)
    n_val = np.minimum(per_class, np.bincount(labels, minlength=num_classes) // 2)
    by_class, rank = _rank_within_class(labels, num_classes, seed)
    is_val = rank < n_val[labels[by_class]]
    return dataset.select(np.sort(by_class[~is_val])), dataset.select(np.sort(by_class[is_val]))


# ----------------------------------------------------------------------------------------------------------------
# the offline demo


def _digit_names() -> List[str]:
    return [str(i) for i in range(10)]


def load_digits_demo(
        image_size: int = 32, imbalance_factor: float = 10.0, test_fraction: float = 0.25, seed: int = 0,
) -> datasets.DatasetDict:
    """scikit-learn's bundled 8x8 digits (1,797 images, offline) as a small long-tailed image dataset.

    Args:
        image_size: side of the RGB images, upsampled (bilinear) from 8x8.
        imbalance_factor: IF of the long-tailed training split (exp profile); 1 keeps it balanced.
        test_fraction: the test split takes ``round(test_fraction * smallest class)`` images of every class
            (balanced, seeded); the rest is the training pool.
        seed: seed of the test split and of the long-tailed choice.

    Returns:
        DatasetDict with "train" (557 images at IF 10, 134 down to 13 per class) and "test" (440 images, 44 per
        class); columns ``image`` (RGB PIL, ``image_size`` x ``image_size``) and ``label`` (ClassLabel "0".."9").
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # values are 0..16
    images = [Image.fromarray(p, mode="L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")
              for p in pixels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=_digit_names())})
    full = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    n_test = max(1, round(test_fraction * int(np.bincount(labels).min())))
    by_class, rank = _rank_within_class(labels, 10, seed)
    is_test = rank < n_test
    train = full.select(np.sort(by_class[~is_test]))
    test = full.select(np.sort(by_class[is_test]))
    if imbalance_factor is not None and imbalance_factor != 1:
        train = make_long_tailed(train, imbalance_factor, seed=seed)
    return datasets.DatasetDict({"train": train, "test": test})


# ----------------------------------------------------------------------------------------------------------------
# generic sources


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else path-shaped is meant as a local path
    return (source.startswith(("/", ".", "~", "\\")) or source.count("/") > 1 or "\\" in source
            or source.endswith(".parquet") or bool(re.match(r"^[A-Za-z]:", source)))


def _split_keyword(path: Path, root: Path) -> Optional[str]:
    """The split a parquet file's name (or, failing that, its folders below ``root``) names, if any."""
    for part in reversed(path.relative_to(root).with_suffix("").parts):
        for token in re.split(r"[-_. 0-9]+", part.lower()):
            if token in _SPLIT_KEYWORDS:
                return _SPLIT_KEYWORDS[token]
    return None


def _load_parquet(path: Path, cache_dir: Optional[str]) -> datasets.DatasetDict:
    data_files: Dict[str, List[str]] = {}
    if path.is_file():  # a single file is the train split unless its name says otherwise
        data_files[_split_keyword(path, path.parent) or "train"] = [str(path)]
    for f in sorted(p for p in path.rglob("*.parquet") if p.is_file()) if path.is_dir() else []:
        # a file named after no split keeps its leading word as split name ("extra.parquet" -> "extra")
        split = _split_keyword(f, path) or (re.match(r"[a-z]*", f.stem.lower()).group(0) or "train")
        data_files.setdefault(split, []).append(str(f))
    rank = {"train": 0, "validation": 1, "test": 2}
    data_files = dict(sorted(data_files.items(), key=lambda kv: (rank.get(kv[0], 3), kv[0])))
    _logger.info("parquet splits of %s: %s", path, {k: len(v) for k, v in data_files.items()})
    return datasets.load_dataset("parquet", data_files=data_files, cache_dir=cache_dir)


def _has_images(path: Path) -> bool:
    return any(p.suffix.lower() in _IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file())


def _load_raw(source: str, config_name: Optional[str], cache_dir: Optional[str]) -> datasets.DatasetDict:
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".parquet":
                raise ValueError(f"{source} is a {path.suffix or 'suffix-less'} file; a file source must be "
                                 ".parquet. Other sources: a folder (parquet, save_to_disk or class sub-folders of "
                                 "images), 'digits' or a Hub dataset id.")
            return _load_parquet(path, cache_dir)
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        if any(path.rglob("*.parquet")):
            return _load_parquet(path, cache_dir)
        if _has_images(path):
            return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        raise ValueError(f"{source} holds no parquet files, no save_to_disk dataset and no images: give a folder "
                         "of parquet files, a Dataset(Dict).save_to_disk folder or class sub-folders of images")
    if _looks_like_path(source):
        raise FileNotFoundError(f"{source} does not exist. Give an existing .parquet file or folder (parquet files, a "
                                "save_to_disk folder or class sub-folders of images), 'digits', or a Hub dataset id")
    try:
        return datasets.load_dataset(source, config_name, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError) as err:
        raise FileNotFoundError(
            f"{source!r} is not a local path, so it was loaded as a Hugging Face Hub dataset id, which failed: {err}. "
            "Check the id and config_name, your network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or give a local path."
        ) from err


def _pick_column(columns: Sequence[str], given: Optional[str], candidates: Sequence[str], what: str, flag: str,
                 where: str) -> str:
    if given is not None:
        if given in columns:
            return given
        raise ValueError(f"no {what} column {given!r} in {where}: columns found: {list(columns)}. "
                         f"Name the right one with {flag}=...")
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"no {what} column in {where} (looked for {', '.join(map(repr, candidates))}): columns found: "
                     f"{list(columns)}. Name it with {flag}=...")


def _image_storage(ds: datasets.Dataset, where: str) -> Tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(bytes [N], paths [N]) of the ``image`` column: an Image feature, a {bytes, path} struct, file paths or raw
    bytes; a missing part is all nulls. Zero-copy views of the memory-mapped column: no image bytes are read."""
    import pyarrow.compute as pc

    feature = ds.features["image"]
    col = ds.with_format("arrow", columns=["image"])["image"]
    col = col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])
    n = len(col)
    if isinstance(feature, datasets.Image) or (isinstance(feature, dict) and feature
                                               and set(feature) <= {"bytes", "path"}):
        names = {col.type.field(i).name for i in range(col.type.num_fields)}
        data = pc.struct_field(col, "bytes") if "bytes" in names else pa.nulls(n, pa.binary())
        paths = pc.struct_field(col, "path") if "path" in names else pa.nulls(n, pa.string())
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        data, paths = pa.nulls(n, pa.binary()), col
    elif isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        data, paths = col, pa.nulls(n, pa.string())
    else:
        raise ValueError(f"the image column of {where} holds {feature}, not images (an Image feature, "
                         "{bytes, path} structs, file paths or encoded bytes): name the image column with "
                         "image_column=...")
    return _as_type(data, pa.binary()), _as_type(paths, pa.string())


def _as_type(array, pa_type: pa.DataType) -> pa.ChunkedArray:
    if pa.types.is_null(array.type):
        array = pa.nulls(len(array), pa_type)
    array = array if array.type == pa_type else array.cast(pa_type)
    return array if isinstance(array, pa.ChunkedArray) else pa.chunked_array([array], pa_type)


def _is_local(path: str) -> bool:
    return "://" not in path and "::" not in path


def _standardise_images(ds: datasets.Dataset, where: str, base_dir: Optional[Path]) -> datasets.Dataset:
    """The ``image`` column as a decoding ``datasets.Image()``, from any of the forms ``_image_storage`` reads.

    Images stored only as a path (no bytes) are checked to exist; a relative path is read relative to
    ``base_dir``, the folder the dataset was loaded from (None for Hub datasets: paths are left as they are).
    """
    feature = ds.features["image"]
    if isinstance(feature, datasets.Image) and feature.decode and base_dir is None:
        return ds
    data, paths = _image_storage(ds, where)
    path_only = data.is_null().to_numpy(zero_copy_only=False) & paths.is_valid().to_numpy(zero_copy_only=False)
    is_image = isinstance(feature, datasets.Image) and feature.decode
    if not path_only.any() or base_dir is None:
        return ds if is_image else ds.cast_column("image", datasets.Image())  # paths, {bytes, path}, bytes
    listed = paths.to_pylist()
    resolved = list(listed)
    for i in np.flatnonzero(path_only):
        if _is_local(listed[i]):
            local = os.path.expanduser(listed[i])
            resolved[i] = local if os.path.isabs(local) else str(base_dir / local)
    missing = [i for i in np.flatnonzero(path_only) if _is_local(resolved[i]) and not os.path.isfile(resolved[i])]
    if missing:
        i = int(missing[0])
        raise FileNotFoundError(
            f"{len(missing)} image file(s) listed in the image column of {where} do not exist, e.g. row {i}: "
            f"{listed[i]!r} (looked for {resolved[i]}). Relative paths are read relative to the dataset folder "
            f"{base_dir}; give absolute paths, or paths relative to that folder.")
    if resolved == listed:
        return ds if is_image else ds.cast_column("image", datasets.Image())
    image = pa.StructArray.from_arrays([data.combine_chunks(), pa.array(resolved, pa.string())],
                                       names=["bytes", "path"])
    label = ds.with_format("arrow", columns=["label"])["label"]
    features = datasets.Features({"image": datasets.Image(), "label": ds.features["label"]})
    return datasets.Dataset(pa.table({"image": image, "label": label}), info=datasets.DatasetInfo(features=features))


def _label_kind(ds: datasets.Dataset, where: str) -> str:
    """"class" (ClassLabel), "int" or "str"; refuses other label columns and missing labels."""
    feature = ds.features["label"]
    col = ds.with_format("arrow", columns=["label"])["label"]
    if col.null_count:
        raise ValueError(f"the label column of {where} has {col.null_count} missing label(s); drop or fill those rows "
                         "first")
    if isinstance(feature, datasets.ClassLabel):
        return "class"
    if isinstance(feature, datasets.Value) and pa.types.is_integer(col.type):
        return "int"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "str"
    raise ValueError(f"the label column of {where} holds {feature}: class labels must be a ClassLabel, integer class "
                     "indices 0..C-1 or class names (strings). Name the right column with label_column=...")


def _check_int_labels(splits: Mapping[str, datasets.Dataset], source: str) -> int:
    """C for integer labels 0..C-1 over all splits; a negative label or a value without images is an error."""
    seen = np.zeros(0, dtype=np.int64)
    for split, ds in splits.items():
        labels = _label_array(ds)
        if labels.size and labels.min() < 0:
            raise ValueError(f"split {split!r} of {source} has label {int(labels.min())}: integer labels must be class "
                             "indices >= 0 (-1 usually marks a test split without public labels)")
        seen = np.union1d(seen, np.unique(labels))
    num_classes = int(seen.max()) + 1 if seen.size else 0
    gaps = np.setdiff1d(np.arange(num_classes), seen)
    if gaps.size:
        hint = " They look 1-based: subtract 1." if gaps.tolist() == [0] else ""
        raise ValueError(
            f"the integer labels of {source} run up to {num_classes - 1}, but {gaps.size} value(s) below that have no "
            f"image in any split: {gaps[:10].tolist()}. Integer labels are read as class indices 0..C-1, each with "
            f"images.{hint} Renumber the classes 0..C-1, or give the column a ClassLabel feature with the class "
            "names (a declared class may have no images).")
    return num_classes


def _encode_string_labels(splits: Mapping[str, datasets.Dataset], source: str) -> datasets.ClassLabel:
    """The ClassLabel of string labels: the training split's sorted names (``class_encode_column``); a name in
    another split that training lacks is an error (its class would have no training image)."""
    train = splits["train"]
    class_label = train.select_columns(["label"]).class_encode_column("label").features["label"]
    known = set(class_label.names)
    for split, ds in splits.items():
        if split == "train":
            continue
        if isinstance(ds.features["label"], datasets.ClassLabel):
            if ds.features["label"].names != class_label.names:
                raise ValueError(f"split {split!r} of {source} has class names {ds.features['label'].names[:5]}..., "
                                 f"the training split's labels are {class_label.names[:5]}...")
            continue
        unseen = sorted(set(ds.unique("label")) - known)
        if unseen:
            raise ValueError(
                f"split {split!r} of {source} has {len(unseen)} class(es) that the training split has no image of: "
                f"{unseen[:10]}. Every class needs training images: add them to the training split, or drop those "
                f"rows from {split!r}.")
    return class_label


def _standardise_labels(splits: Dict[str, datasets.Dataset], source: str) -> datasets.DatasetDict:
    """Give every split one ClassLabel: kept as it is, built for integer indices ("0".."C-1"), or encoded from
    string labels (sorted names of the training split)."""
    kinds = {split: _label_kind(ds, f"split {split!r} of {source}") for split, ds in splits.items()}
    if kinds["train"] == "str":
        if "int" in kinds.values():
            bad = next(s for s, k in kinds.items() if k == "int")
            raise ValueError(f"split {bad!r} of {source} has integer labels but the training split has class names "
                             "(strings): give every split the same kind of label column")
        target = _encode_string_labels(splits, source)
    elif "str" in kinds.values():
        bad = next(s for s, k in kinds.items() if k == "str")
        raise ValueError(f"split {bad!r} of {source} has string labels but the training split has class indices: "
                         "give every split the same kind of label column")
    else:
        class_labels = [ds.features["label"] for s, ds in splits.items() if kinds[s] == "class"]
        if any(cl.names != class_labels[0].names for cl in class_labels):
            raise ValueError(f"the splits of {source} have different class names: "
                             f"{[cl.names[:5] for cl in class_labels]}")
        ints = {s: ds for s, ds in splits.items() if kinds[s] == "int"}
        if not ints:
            return datasets.DatasetDict(splits)
        if class_labels:
            target = class_labels[0]
            for split, ds in ints.items():
                labels = _label_array(ds)
                if labels.size and (labels.min() < 0 or labels.max() >= target.num_classes):
                    bad = int(labels[(labels < 0) | (labels >= target.num_classes)][0])
                    raise ValueError(f"split {split!r} of {source} has label {bad}, outside the "
                                     f"{target.num_classes} class names of the other splits")
        else:
            num_classes = _check_int_labels(ints, source)
            target = datasets.ClassLabel(names=[str(i) for i in range(num_classes)])
    return datasets.DatasetDict({s: ds if kinds[s] == "class" else ds.cast_column("label", target)
                                 for s, ds in splits.items()})


def _standardise(dd: datasets.DatasetDict, image_column: Optional[str], label_column: Optional[str],
                 source: str, base_dir: Optional[Path] = None) -> datasets.DatasetDict:
    """Select, rename and type the image / label columns of every split; give all splits one ClassLabel.

    Images: an ``Image`` feature, ``{bytes, path}`` structs, file paths (relative ones read relative to
    ``base_dir``) or encoded bytes, all cast to a decoding ``datasets.Image()``. Labels: see ``load_image_dataset``.
    """
    out: Dict[str, datasets.Dataset] = {}
    for split, ds in dd.items():
        where = f"split {split!r} of {source}"
        img = _pick_column(ds.column_names, image_column, IMAGE_COLUMNS, "image", "image_column", where)
        lab = _pick_column(ds.column_names, label_column, LABEL_COLUMNS, "label", "label_column", where)
        if img == lab:
            raise ValueError(f"image_column and label_column are both {img!r} in {where}")
        ds = ds.select_columns([img, lab])
        if (img, lab) != ("image", "label"):
            ds = ds.rename_columns({k: v for k, v in ((img, "image"), (lab, "label")) if k != v})
        out[split] = _standardise_images(ds, f"{where} (column {img!r})", base_dir)
    return _standardise_labels(out, source)


def load_image_dataset(
        source: str,
        *,
        config_name: Optional[str] = None,
        train_split: str = "train",
        test_split: Optional[str] = "test",
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        cache_dir: Optional[str] = None,
) -> datasets.DatasetDict:
    """Load an image classification dataset with standard ``image`` / ``label`` columns.

    Args:
        source: ``"digits"`` (the offline demo, ``load_digits_demo``); a ``.parquet`` file or a folder of parquet
            files (splits named by their files: train.parquet, test-00000-of-00001.parquet, data/train-*.parquet;
            a single file is the train split unless its name says test/validation); a ``save_to_disk`` folder; an
            image folder (class sub-folders, optionally under train/ and test/); else a Hub dataset id.
        config_name: Hub dataset configuration.
        train_split: the source split returned as "train".
        test_split: the source split returned as "test"; the default "test" is left out silently when the source
            has none, a split named otherwise must exist; None returns no test split.
        image_column: image column (default: the first of ``img``, ``image``): an ``Image`` feature, ``{bytes, path}``
            structs (parquet files written by other tools), encoded image bytes, or file paths. Paths stored without
            bytes must exist; relative ones are read relative to the dataset folder (the folder given, or the folder
            of the parquet file given).
        label_column: label column (default: the first of ``label``, ``fine_label``): a ``ClassLabel`` (kept with
            its names); integer class indices 0..C-1 (a negative value, or a value below the largest that has no
            image in any split, is an error naming it: such labels are not class indices, e.g. 1-based or sparse
            ids); or class names as strings, encoded like ``Dataset.class_encode_column`` (names sorted) from the
            training split, the other splits cast to the same ClassLabel (a name the training split lacks is an
            error).
        cache_dir: ``datasets`` cache folder.

    Returns:
        DatasetDict with "train", "val" when the source has a split named one of ``VAL_SPLITS`` (other than
        train_split and test_split) and, when there is one, "test"; columns ``image`` (``datasets.Image``, decoded
        lazily) and ``label`` (one ``ClassLabel`` for all splits, names "0".."C-1" for integer labels). Other
        columns are dropped.
    """
    if source == "digits":
        return load_digits_demo()
    raw = _load_raw(source, config_name, cache_dir)
    found = list(raw.keys())
    if train_split not in raw:
        raise ValueError(f"split {train_split!r} not found in {source}: splits found: {found}. "
                         "Choose one with train_split=...")
    splits = {"train": raw[train_split]}
    own_val = next((s for s in VAL_SPLITS if s in raw and s not in (train_split, test_split)), None)
    if own_val is not None:  # the source's own validation split, used for model selection
        splits["val"] = raw[own_val]
    if test_split is not None:
        if test_split in raw:
            splits["test"] = raw[test_split]
        elif test_split != "test":
            raise ValueError(f"split {test_split!r} not found in {source}: splits found: {found}. "
                             "Choose one with test_split=... (None for no test split)")
        else:
            _logger.info("%s has no 'test' split (splits found: %s): returning train only", source, found)
    local = Path(source).expanduser()
    base_dir = (local.parent if local.is_file() else local).resolve() if local.exists() else None
    return _standardise(datasets.DatasetDict(splits), image_column, label_column, source, base_dir)


# ----------------------------------------------------------------------------------------------------------------
# benchmark image lists


def _path_dataset(paths: Sequence[str], labels: np.ndarray, class_label: datasets.ClassLabel) -> datasets.Dataset:
    """A Dataset whose ``image`` column holds file paths (read only when a row is decoded).

    Built from Arrow arrays directly: ``Dataset.from_dict`` would run ``Image.encode_example`` per row (seconds
    for iNaturalist's 437k paths), while the storage of an undecoded path is just ``{bytes: null, path: str}``.
    """
    n = len(paths)
    image = pa.StructArray.from_arrays([pa.nulls(n, pa.binary()), pa.array(list(paths), pa.string())],
                                       names=["bytes", "path"])
    table = pa.table({"image": image, "label": pa.array(labels, pa.int64())})
    features = datasets.Features({"image": datasets.Image(), "label": class_label})
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def _class_label(num_classes: Optional[int], class_names: Optional[Sequence[str]], labels: np.ndarray,
                 where: str) -> datasets.ClassLabel:
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given")
        num_classes = len(class_names)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise ValueError(f"{where}: label {bad} is outside [0, {num_classes})")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return datasets.ClassLabel(names=names)


def _read_split_file(split_file: Union[str, Path]) -> Tuple[List[str], np.ndarray]:
    path = Path(split_file)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found: give the path of an OLTR-style list "
                                "('relative/path label' per line), e.g. ImageNet_LT_train.txt")
    rel_paths: List[str] = []
    labels: List[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)  # rsplit: image paths may contain spaces
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise ValueError(f"{path}:{lineno}: expected 'relative/path integer_label', got {line!r}")
            rel_paths.append(parts[0])
            labels.append(int(parts[1]))
    return rel_paths, np.asarray(labels, dtype=np.int64)


def _join(root: Union[str, Path], rel_paths: Sequence[str]) -> List[str]:
    root = os.path.abspath(os.path.expanduser(str(root)))  # absolute: workers may run elsewhere
    return [os.path.join(root, p.lstrip("/")) for p in rel_paths]


def load_split_file(
        root: Union[str, Path],
        split_file: Union[str, Path],
        num_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
) -> datasets.Dataset:
    """An ImageNet-LT / Places-LT split file (OLTR format: ``relative/path label`` per line) as a Dataset.

    No image is opened: the ``image`` column holds ``root/relative/path`` cast to ``datasets.Image()``, decoded
    when a row is read (a missing file fails then, not here).

    Args:
        root: the image root the listed paths are relative to.
        split_file: the list, e.g. ``ImageNet_LT_train.txt``.
        num_classes: C (default: ``len(class_names)``, else the largest label + 1).
        class_names: names of the C classes (default "0".."C-1").

    Returns:
        Dataset [N rows] with ``image`` and ``label`` (ClassLabel).
    """
    rel_paths, labels = _read_split_file(split_file)
    class_label = _class_label(num_classes, class_names, labels, str(split_file))
    return _path_dataset(_join(root, rel_paths), labels, class_label)


def _read_inaturalist(annotation_json: Union[str, Path]) -> Tuple[List[str], np.ndarray, Optional[Dict[int, str]]]:
    path = Path(annotation_json)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found: give the iNaturalist 2018 JSON, e.g. "
                                "train2018.json or val2018.json")
    with open(path, encoding="utf-8") as f:
        coco = json.load(f)
    if not coco.get("annotations"):
        raise ValueError(f"{path} has no 'annotations' (a test-set file without labels?): cannot give labels")
    category_of = {a["image_id"]: a["category_id"] for a in coco["annotations"]}
    images = coco.get("images", [])
    unlabelled = sum(1 for im in images if im["id"] not in category_of)
    if unlabelled:
        _logger.warning("%s: %d images have no annotation and are left out", path, unlabelled)
    files = [im["file_name"] for im in images if im["id"] in category_of]
    category_ids = np.asarray([category_of[im["id"]] for im in images if im["id"] in category_of], dtype=np.int64)
    categories = {int(c["id"]): str(c.get("name", c["id"])) for c in coco.get("categories", [])} or None
    return files, category_ids, categories


def _inat_dataset(root: Union[str, Path], files: List[str], category_ids: np.ndarray,
                  categories: Optional[Dict[int, str]], where: str) -> datasets.Dataset:
    if categories is None:
        return _path_dataset(_join(root, files), category_ids, _class_label(None, None, category_ids, where))
    # labels are positions in the sorted category ids (the ids themselves for iNaturalist 2018's 0..8141)
    ids = np.asarray(sorted(categories), dtype=np.int64)
    labels = np.searchsorted(ids, category_ids)
    unknown = (labels >= ids.size) | (ids[np.minimum(labels, ids.size - 1)] != category_ids)
    if unknown.any():
        raise ValueError(f"{where}: category_id {int(category_ids[unknown][0])} is not in 'categories'")
    class_label = datasets.ClassLabel(names=[categories[int(i)] for i in ids])
    return _path_dataset(_join(root, files), labels, class_label)


def load_inaturalist(root: Union[str, Path], annotation_json: Union[str, Path]) -> datasets.Dataset:
    """An iNaturalist 2018 COCO-style annotation file as a Dataset (no image is opened).

    Args:
        root: the folder ``file_name`` entries are relative to (it holds ``train_val2018/``).
        annotation_json: ``train2018.json`` / ``val2018.json``: ``images`` (``id``, ``file_name``),
            ``annotations`` (``image_id``, ``category_id``) and optionally ``categories`` (``id``, ``name``).

    Returns:
        Dataset with ``image`` (paths cast to ``datasets.Image()``) and ``label``: the position of the category id
        among the sorted ``categories`` ids, named by ``name`` (without ``categories``: the id itself, names "0"..).
    """
    files, category_ids, categories = _read_inaturalist(annotation_json)
    return _inat_dataset(root, files, category_ids, categories, str(annotation_json))


# name -> split -> file name, and the class count of the published lists
BENCHMARKS: Dict[str, Dict[str, object]] = {
    "imagenet_lt": {"files": {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
                              "test": "ImageNet_LT_test.txt"}, "num_classes": 1000},
    "places_lt": {"files": {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt",
                            "test": "Places_LT_test.txt"}, "num_classes": 365},
    "inat2018": {"files": {"train": "train2018.json", "val": "val2018.json"}, "num_classes": 8142},
}


def load_benchmark(name: str, root: Union[str, Path], split_dir: Optional[Union[str, Path]] = None
                   ) -> datasets.DatasetDict:
    """A long-tailed benchmark from its published image lists over a local image root.

    Args:
        name: ``"imagenet_lt"``, ``"places_lt"`` or ``"inat2018"``.
        root: the image root the lists' paths are relative to.
        split_dir: the folder holding the lists (default ``root``): ImageNet_LT_{train,val,test}.txt,
            Places_LT_{train,val,test}.txt, or train2018.json / val2018.json.

    Returns:
        DatasetDict with the splits found among "train", "val", "test" (train is required), sharing one
        ClassLabel (C = the largest label of all splits + 1 for the text lists).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    split_dir = Path(split_dir if split_dir is not None else root).expanduser()
    files: Mapping[str, str] = BENCHMARKS[name]["files"]  # type: ignore[assignment]
    present = {split: split_dir / f for split, f in files.items() if (split_dir / f).is_file()}
    if "train" not in present:
        raise FileNotFoundError(f"{name}: training list {split_dir / files['train']} not found; expected "
                                f"{', '.join(files.values())} in {split_dir} (set split_dir=...)")
    missing = [str(split_dir / f) for s, f in files.items() if s not in present]
    if missing:
        _logger.info("%s: no %s, those splits are left out", name, ", ".join(missing))
    if name == "inat2018":
        read = {split: _read_inaturalist(path) for split, path in present.items()}
        return datasets.DatasetDict({split: _inat_dataset(root, f, c, cats, str(present[split]))
                                     for split, (f, c, cats) in read.items()})
    read_lists = {split: _read_split_file(path) for split, path in present.items()}
    num_classes = max(int(labels.max(initial=-1)) + 1 for _, labels in read_lists.values())
    expected = BENCHMARKS[name]["num_classes"]
    if num_classes != expected:
        _logger.info("%s: the lists hold %d classes (the published benchmark has %s)", name, num_classes, expected)
    out = {}
    for split, (rel_paths, labels) in read_lists.items():
        class_label = _class_label(num_classes, None, labels, str(present[split]))
        out[split] = _path_dataset(_join(root, rel_paths), labels, class_label)
    return datasets.DatasetDict(out)
