"""The long-tailed benchmarks from their published image lists over a local image root: ImageNet-LT and Places-LT
(OLTR split files, ``relative/path label`` per line) and iNaturalist 2018 (COCO-style JSON).

No image is opened here: the ``image`` column holds paths cast to ``datasets.Image()``, decoded when a row is read
(a missing file fails then).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np

from ..files import read_json
from ..labels import check_labels

__all__ = ["BENCHMARKS", "load_benchmark", "load_inaturalist", "load_split_file"]

_logger = logging.getLogger(__name__)


def _path_dataset(paths: Sequence[str], labels: np.ndarray, class_label: datasets.ClassLabel) -> datasets.Dataset:
    """A Dataset whose ``image`` column holds file paths, cast to ``datasets.Image()`` (read only when a row is
    decoded; the cast is one Arrow operation, no file is opened: 0.3 s for iNaturalist's 437k paths)."""
    features = datasets.Features({"image": datasets.Value("string"), "label": class_label})
    table = datasets.Dataset.from_dict({"image": list(paths), "label": labels.tolist()}, features=features)
    return table.cast_column("image", datasets.Image())


def _class_label(num_classes: Optional[int], class_names: Optional[Sequence[str]], labels: np.ndarray,
                 where: str) -> datasets.ClassLabel:
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given")
        num_classes = len(class_names)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    check_labels(labels, num_classes, what=f"{where}: label")
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
    coco = read_json(path, fix="Give the annotation file of iNaturalist 2018 as published.")
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
