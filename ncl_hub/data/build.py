"""The data of a training run, by the benchmark's protocol: the dataset loaded, every image of the splits used
checked (:mod:`.checks`), its training split made long-tailed, a balanced validation split for model selection, the
test split kept for the end; every input problem a ``ConfigError`` before training starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


from ..config import ConfigError, DataConfig, RunConfig
from ..labels import check_labels
from .benchmarks import BENCHMARKS, load_benchmark
from .checks import check_split, unreadable_error
from .longtail import class_counts, is_balanced, long_tailed_split, make_long_tailed, split_validation
from .sources import load_image_dataset

__all__ = ["DataBundle", "build_data", "classes_without_images", "name_list"]


@dataclass
class DataBundle:
    """The splits of a run (``datasets.Dataset`` objects with ``image`` and ``label``) and what the model needs to
    know about them."""

    train: Any
    val: Optional[Any]
    test: Optional[Any]
    class_names: List[str]
    class_counts: List[int]  # training images per class [C]
    source: str
    notes: List[str] = field(default_factory=list)  # how train / val were made, printed at start
    # images left out because they cannot be read (data.skip_unreadable): split -> [{row, where, reason}]
    unreadable: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_data(cfg: RunConfig, check: Sequence[str] = ("train", "val", "test")) -> DataBundle:
    """Load the dataset, check its images, make the train split long-tailed, hold out a balanced validation split.

    Every problem with the input (a missing path, no image or label column, bad labels, an empty class, an image
    that cannot be read) is raised as a ConfigError naming it, before any training. ``check``: the source splits
    whose every image is decoded once first (``train``, the source's own ``val``, ``test``; the caller's choice of
    the splits it will read); with ``data.skip_unreadable`` the unreadable ones are left out instead."""
    try:
        return _build_data(cfg, check)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data: {e}") from e


def _load_splits(dc: DataConfig) -> dict:
    if dc.dataset in BENCHMARKS:
        if not dc.benchmark_root:
            raise ConfigError(f"dataset {dc.dataset!r} needs --data.benchmark_root (the folder of its images)")
        splits = dict(load_benchmark(dc.dataset, dc.benchmark_root))
        if dc.test_split and dc.test_split != "test" and dc.test_split in splits:  # iNaturalist: val is the test
            splits["test"] = splits.pop(dc.test_split)
        return splits
    return dict(load_image_dataset(dc.dataset, config_name=dc.config_name, train_split=dc.train_split,
                                   test_split=dc.test_split or "test", image_column=dc.image_column,
                                   label_column=dc.label_column))


def _build_data(cfg: RunConfig, check: Sequence[str]) -> DataBundle:
    dc = cfg.data
    splits = _load_splits(dc)
    splits, unreadable, check_notes = _check_images(splits, dc, check)
    train = splits["train"]
    names = _class_names(train)
    _check_labels(train, len(names), dc.train_split)
    if dc.imbalance_factor is not None and dc.imbalance_factor < 1:
        raise ConfigError(f"imbalance_factor must be >= 1, got {dc.imbalance_factor}")
    train, val, notes = _train_and_val(train, splits.get("val") if dc.val_per_class > 0 else None, dc, names)
    notes = notes + check_notes
    if dc.limit_train is not None and dc.limit_train < len(train):
        train = train.shuffle(seed=cfg.seed).select(range(dc.limit_train))
    counts = class_counts(train, len(names))
    empty = [i for i, n in enumerate(counts) if n == 0]
    if empty:
        shown = ", ".join(f"{i} ({names[i]})" for i in empty[:10])
        raise ConfigError(f"{len(empty)} class(es) have no training images after long-tailed resampling and the "
                          f"validation hold-out: {shown}. Lower the imbalance factor or --data.val_per_class.")
    test = None
    if dc.test_split and "test" in splits:
        test = splits["test"]
        _check_labels(test, len(names), dc.test_split)
    if dc.limit_eval is not None:
        val = val.select(range(min(dc.limit_eval, len(val)))) if val is not None else None
        test = test.select(range(min(dc.limit_eval, len(test)))) if test is not None else None
    absent = classes_without_images(test, names) if test is not None else []
    if absent:
        notes.append(f"test: {len(absent)} of {len(names)} classes have no test images: {name_list(absent)}; "
                     "their accuracy is not measured (many / medium / few average the classes present)")
    return DataBundle(train=train, val=val if val is not None and len(val) else None, test=test,
                      class_names=names, class_counts=counts, source=dc.dataset, notes=notes, unreadable=unreadable)


def _check_images(splits: dict, dc: DataConfig, check: Sequence[str]) -> Tuple[dict, Dict[str, list], List[str]]:
    """Decode every image of the source splits in ``check`` (that the run uses) once, or read the record of an
    earlier check; stop with one error naming every unreadable image, or (``skip_unreadable``) leave them out."""
    used = {"train": True, "val": dc.val_per_class > 0, "test": bool(dc.test_split)}
    notes: List[str] = []
    bad = []
    for name in ("train", "val", "test"):
        if name in splits and name in check and used[name]:
            bad += check_split(splits[name], name, num_workers=dc.num_workers, log=notes.append,
                               cache_dir=Path(dc.check_cache) if dc.check_cache else None)
    if not bad:
        return splits, {}, notes
    if not dc.skip_unreadable:
        raise unreadable_error(bad)
    unreadable: Dict[str, list] = {}
    for name in {b.split for b in bad}:
        rows = {b.row for b in bad if b.split == name}
        splits[name] = splits[name].select([i for i in range(len(splits[name])) if i not in rows])
        unreadable[name] = [{"row": b.row, "where": b.where, "reason": b.reason} for b in bad if b.split == name]
    shown = "; ".join(b.line() for b in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
    notes.append(f"{len(bad)} unreadable image(s) left out (data.skip_unreadable; listed in run_info.json): {shown}")
    return splits, unreadable, notes


def _class_names(dataset) -> List[str]:
    feature = dataset.features["label"]
    names = getattr(feature, "names", None)
    if not names:
        raise ConfigError("the label column has no class names (ClassLabel); cannot tell the number of classes")
    return list(names)


def _check_labels(dataset, num_classes: int, split: str) -> None:
    labels = dataset.with_format(None)["label"] if len(dataset) else []
    try:
        check_labels(labels, num_classes, what=f"{split} label")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def classes_without_images(dataset, names: List[str]) -> List[str]:
    """The names of the classes with no image in ``dataset``."""
    return [names[c] for c, n in enumerate(class_counts(dataset, len(names))) if n == 0]


def name_list(names: List[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def _train_and_val(train, own_val, dc: DataConfig, names: List[str]):
    """The training set and the validation set, by the benchmark's protocol (``DataConfig.val_per_class``):

    1. the dataset's own validation split when it has one (ImageNet-LT, Places-LT, iNaturalist, a Hub dataset
       with a ``validation`` split);
    2. else, when the library makes a balanced split long-tailed, the images the subsampling discards
       (balanced, ``val_per_class`` per class), so the training set is exactly the benchmark's;
    3. else a balanced hold-out from the training images (at most half of each class), reported per class.

    The choice follows ``data.lt_seed``, so every training seed of a study sees the same images.
    Returns ``(train, val or None, notes)``; the notes say where validation came from.
    """
    notes: List[str] = []
    make_lt = dc.imbalance_factor is not None
    if make_lt and not is_balanced(class_counts(train, len(names))):
        notes.append(f"the training split is already long-tailed: data.imbalance_factor={dc.imbalance_factor:g} "
                     "is ignored")
        make_lt = False
    lt_args = dict(profile=dc.lt_profile, seed=dc.lt_seed, n_max=dc.lt_head_size)
    if not make_lt and dc.lt_head_size is not None:
        raise ConfigError("data.lt_head_size needs data.imbalance_factor and a balanced training split")
    if own_val is not None:
        notes.append(f"validation: the dataset's own validation split ({len(own_val)} images)")
        return (make_long_tailed(train, dc.imbalance_factor, **lt_args) if make_lt else train), own_val, notes
    if dc.val_per_class == 0:
        return (make_long_tailed(train, dc.imbalance_factor, **lt_args) if make_lt else train), None, notes
    if make_lt:
        train, val, val_counts = long_tailed_split(train, dc.imbalance_factor, dc.val_per_class, **lt_args)
        notes.append(f"validation: {len(val)} images the long-tail subsampling left out, up to {dc.val_per_class} "
                     "per class; the training set is the benchmark's")
        short = [f"{names[c]} {n}" for c, n in enumerate(val_counts) if n < dc.val_per_class]
        if short:
            notes.append("classes with fewer validation images (they keep every image for training; validation "
                         f"accuracy averages the classes it has): {', '.join(short)}")
        return train, val, notes
    before = class_counts(train, len(names))
    train, val = split_validation(train, per_class=dc.val_per_class, seed=dc.lt_seed)
    taken = class_counts(val, len(names))
    notes.append(f"validation: {len(val)} images held out of the training split (no validation split, nothing "
                 "discarded to take them from); per class taken / had: "
                 + ", ".join(f"{names[c]} {t}/{n}" for c, (t, n) in enumerate(zip(taken, before))))
    return train, val, notes
