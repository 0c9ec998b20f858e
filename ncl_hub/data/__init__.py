"""Image datasets for long-tailed training, as Hugging Face ``datasets`` objects, and the loaders that feed them.

``columns`` names the columns and splits recognised, ``sources`` loads a dataset (the offline digits demo, parquet,
``save_to_disk`` and image folders, Hub ids), ``benchmarks`` the published image lists of ImageNet-LT, Places-LT and
iNaturalist 2018, ``longtail`` makes long-tailed subsets and balanced validation splits from the label column alone,
``build`` assembles the data of a training run by the benchmark's protocol; ``transforms`` (images to tensors),
``samplers`` (the epoch's order) and ``loaders`` turn them into DataLoaders. The ``tensor`` package is
``data.pipeline=tensor``: splits decoded once to uint8 tensors on the device, batches augmented there.
"""
from .benchmarks import BENCHMARKS, load_benchmark, load_inaturalist, load_split_file
from .build import DataBundle, build_data, classes_without_images, name_list
from .columns import IMAGE_COLUMNS, LABEL_COLUMNS, VALIDATION_SPLITS
from .loaders import EpochSeededDataset, build_eval_loader, build_train_loader
from .longtail import (
    PROFILES, class_counts, is_balanced, label_array, long_tailed_counts, long_tailed_split, make_long_tailed,
    prepare_long_tailed, rank_within_class, split_validation,
)
from .sources import load_digits_demo, load_image_dataset

__all__ = [
    "BENCHMARKS", "DataBundle", "EpochSeededDataset", "IMAGE_COLUMNS", "LABEL_COLUMNS", "PROFILES",
    "VALIDATION_SPLITS", "build_data", "build_eval_loader", "build_train_loader", "class_counts",
    "classes_without_images", "is_balanced", "label_array", "load_benchmark", "load_digits_demo", "load_image_dataset",
    "load_inaturalist", "load_split_file", "long_tailed_counts", "long_tailed_split", "make_long_tailed", "name_list",
    "prepare_long_tailed", "rank_within_class", "split_validation",
]
