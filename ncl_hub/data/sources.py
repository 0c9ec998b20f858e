"""Image classification datasets as Hugging Face ``datasets`` objects with two standard columns: ``image`` (a
``datasets.Image`` feature, decoded lazily when a row is read) and ``label`` (one ``ClassLabel`` for every split).

Sources (:func:`load_image_dataset`): the offline ``"digits"`` demo, a parquet file, a ``save_to_disk`` folder, any
folder ``datasets.load_dataset`` reads (parquet files, class sub-folders of images; the splits named by the file
and folder names) and Hub dataset ids. Images may be an ``Image`` feature, ``{bytes, path}`` structs, encoded bytes
or file paths (relative ones are read relative to the dataset folder); labels a ``ClassLabel``, integer class
indices or class names.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import datasets
import numpy as np
import pyarrow as pa

from ..labels import check_labels
from .columns import IMAGE_COLUMNS, LABEL_COLUMNS, VALIDATION_SPLITS
from .longtail import label_array, long_tailed_split, make_long_tailed, rank_within_class

__all__ = ["load_digits_demo", "load_image_dataset"]

_logger = logging.getLogger(__name__)


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
        source: ``"digits"`` (the offline demo, ``load_digits_demo``); a ``.parquet`` file (the train split); a
            ``save_to_disk`` folder; a folder ``datasets.load_dataset(folder)`` reads: parquet files or class
            sub-folders of images, splits named by the file and folder names (train.parquet,
            test-00000-of-00001.parquet, data/train-*.parquet, train/ and test/); else a Hub dataset id.
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
        DatasetDict with "train", "val" when the source has a split named one of ``VALIDATION_SPLITS`` (other than
        train_split and test_split) and, when there is one, "test"; columns ``image`` (``datasets.Image``, decoded
        lazily) and ``label`` (one ``ClassLabel`` for all splits, names "0".."C-1" for integer labels). Other
        columns are dropped.
    """
    if source == "digits":
        return load_digits_demo()
    splits = _pick_splits(_load_raw(source, config_name, cache_dir), source, train_split, test_split)
    local = Path(source).expanduser()
    base_dir = (local.parent if local.is_file() else local).resolve() if local.exists() else None
    return _standardise(datasets.DatasetDict(splits), image_column, label_column, source, base_dir)


def _pick_splits(raw: Mapping, source: str, train_split: str, test_split: Optional[str]) -> dict:
    """"train", "val" (the source's own validation split, if any) and "test" of the source's splits."""
    found = list(raw.keys())
    if train_split not in raw:
        raise ValueError(f"split {train_split!r} not found in {source}: splits found: {found}. "
                         "Choose one with train_split=...")
    splits = {"train": raw[train_split]}
    own_val = next((s for s in VALIDATION_SPLITS if s in raw and s not in (train_split, test_split)), None)
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
    return splits


def _digit_names() -> List[str]:
    return [str(i) for i in range(10)]


def load_digits_demo(
        image_size: int = 32, imbalance_factor: float = 10.0, test_fraction: float = 0.25, seed: int = 0,
        val_per_class: int = 20,
) -> datasets.DatasetDict:
    """scikit-learn's bundled 8x8 digits (1,797 images, offline) as a small long-tailed image dataset.

    Args:
        image_size: side of the RGB images, upsampled (bilinear) from 8x8.
        imbalance_factor: IF of the long-tailed training split (exp profile); 1 keeps it balanced.
        test_fraction: the test split takes ``round(test_fraction * smallest class)`` images of every class
            (balanced, seeded); the rest is the training pool.
        seed: seed of the test split and of the long-tailed choice.
        val_per_class: validation images per class, taken from the images the long-tail subsampling leaves out
            (as the library does for CIFAR-LT), so the training split stays whole; the head class keeps all its
            images and gives none. 0, or an imbalance factor of 1, gives no validation split.

    Returns:
        DatasetDict with "train" (557 images at IF 10, 134 down to 13 per class), "val" (20 per class but the head
        class: 180 images) and "test" (440 images, 44 per class); columns ``image`` (RGB PIL, ``image_size`` x
        ``image_size``) and ``label`` (ClassLabel "0".."9").
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
    by_class, rank = rank_within_class(labels, 10, seed)
    is_test = rank < n_test
    train = full.select(np.sort(by_class[~is_test]))
    test = full.select(np.sort(by_class[is_test]))
    if imbalance_factor is None or imbalance_factor == 1:
        return datasets.DatasetDict({"train": train, "test": test})
    if val_per_class <= 0:
        return datasets.DatasetDict({"train": make_long_tailed(train, imbalance_factor, seed=seed), "test": test})
    train, val, _ = long_tailed_split(train, imbalance_factor, val_per_class, seed=seed)
    return datasets.DatasetDict({"train": train, "val": val, "test": test})


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else path-shaped is meant as a local path
    return (source.startswith(("/", ".", "~", "\\")) or source.count("/") > 1 or "\\" in source
            or source.endswith(".parquet") or bool(re.match(r"^[A-Za-z]:", source)))


def _parquet_splits(folder: Path) -> Dict[str, List[str]]:
    """The parquet files of ``folder`` by split, as ``datasets`` names splits from file and folder names; other
    files (the images parquet rows point to) are left out, so they cannot make a split look like an image folder."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    files = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder),
                                        allowed_extensions=[".parquet"])
    return {str(split): list(paths) for split, paths in files.items() if len(paths)}


def _load_raw(source: str, config_name: Optional[str], cache_dir: Optional[str]) -> datasets.DatasetDict:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise ValueError(f"{source} is a {path.suffix or 'suffix-less'} file; a file source must be "
                             ".parquet. Other sources: a folder (parquet, save_to_disk or class sub-folders of "
                             "images), 'digits' or a Hub dataset id.")
        return datasets.load_dataset("parquet", data_files={"train": str(path)}, cache_dir=cache_dir)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        try:  # datasets infers the format (parquet, images, ...) and the splits from the file and folder names
            if any(path.rglob("*.parquet")):
                return datasets.load_dataset("parquet", data_files=_parquet_splits(path), cache_dir=cache_dir)
            return datasets.load_dataset(str(path), cache_dir=cache_dir)
        except FileNotFoundError as err:  # datasets' EmptyDatasetError / DataFilesNotFoundError
            raise ValueError(f"{source} holds no parquet files, no save_to_disk dataset and no images: give a "
                             "folder of parquet files, a Dataset(Dict).save_to_disk folder or class sub-folders of "
                             f"images ({err})") from err
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
        labels = label_array(ds)
        try:
            check_labels(labels, what=f"split {split!r} of {source}: label")
        except ValueError as e:
            raise ValueError(f"{e} (-1 usually marks a test split without public labels)") from None
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
                check_labels(label_array(ds), target.num_classes,
                             what=f"split {split!r} of {source} (the other splits name {target.num_classes} classes): "
                                  "label")
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
