"""Decoded splits on disk, for ``data.pipeline=tensor``: every image of a split decoded once, made RGB (``to_rgb``)
and fitted to the model's input size the way the PIL path fits it, stored as one uint8 tensor [N, 3, H, W] with the
labels [N] in a safetensors file.

The file is named by a key: a SHA-256 of the selected rows' encoded images (their bytes, or the path of an image
stored as a path only) and labels, in order, and of the fitting transform. A change to the data, to the selection
(the long-tailed subset, the validation hold-out, ``limit_*``) or to the input size gives another key and the split
is decoded again; otherwise the file is read back. The folder may be deleted at any time.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms as T

from ... import files
from ..transforms import ToRGB, TransformedImageDataset, input_hw

__all__ = ["DecodedSplit", "FORMAT_VERSION", "content_key", "decode_split", "default_cache_dir", "fit_transform"]

_logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"  # bump when the decoding changes: old files then no longer match any key


@dataclass
class DecodedSplit:
    """A split decoded to tensors."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    skipped: List[int]  # rows that could not be decoded (on_decode_error=skip): they hold the next readable image
    path: Path  # the cache file
    built: bool  # decoded now; False: read from the cache file


def default_cache_dir() -> Path:
    """``ncl_hub_decoded`` beside the Hugging Face datasets cache: ``$HF_DATASETS_CACHE``, else
    ``$HF_HOME/datasets``, else ``~/.cache/huggingface/datasets``."""
    if os.environ.get("HF_DATASETS_CACHE"):
        root = Path(os.environ["HF_DATASETS_CACHE"])
    else:
        root = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets"
    return root.expanduser().parent / "ncl_hub_decoded"


def fit_transform(kind: str, pretrained_cfg: Mapping[str, Any]) -> Callable[[Any], Any]:
    """The PIL path's steps before its random ones, PIL image in, RGB PIL image at the model's input size out.

    ``"train"``: ``to_rgb``, resize of the shorter side, centre crop (``cifar_train_transform`` and the ``none``
    policy start so). ``"eval"``: ``to_rgb`` and timm's evaluation resize and centre crop (``eval_transform``
    without its ToTensor and Normalize).
    """
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    if kind == "train":
        h, w = input_hw(config["input_size"])
        return T.Compose([ToRGB(), T.Resize(min(h, w), interpolation=str_to_interp_mode(config["interpolation"])),
                          T.CenterCrop((h, w))])
    if kind == "eval":
        steps = create_transform(**config, is_training=False).transforms
        cut = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
        return T.Compose([ToRGB(), *steps[:cut]])
    raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")


def content_key(dataset: Any, description: str) -> str:
    """SHA-256 (hex) of ``description`` and of every row's encoded image (bytes, or path when stored as a path
    only) and label, in order. Reads the Arrow columns only: no image is decoded."""
    digest = hashlib.sha256(f"ncl_hub decoded v{FORMAT_VERSION}\n{description}\n".encode())
    images = dataset.with_format("arrow", columns=["image"])["image"]
    labels = dataset.with_format("arrow", columns=["label"])["label"]
    digest.update(str(len(labels)).encode())
    digest.update(labels.to_numpy().astype("<i8").tobytes())
    for row in images.to_pylist():
        if isinstance(row, dict):
            data = row.get("bytes")
            digest.update(b"B" + data if data is not None else b"P" + str(row.get("path")).encode())
        else:  # raw bytes or a path column
            digest.update(b"B" + row if isinstance(row, bytes) else b"P" + str(row).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def decode_split(dataset: Any, fit: Callable[[Any], Any], cache_dir: Path, *, name: str, num_workers: int = 0,
                 on_decode_error: str = "raise") -> DecodedSplit:
    """The split ``dataset`` decoded through ``fit`` (PIL image -> PIL image at the input size), read from
    ``cache_dir`` when a file with its key exists, else decoded (in ``num_workers`` DataLoader workers) and written
    there (atomically: a temporary file, then a rename).

    Args:
        dataset: a ``datasets.Dataset`` with ``image`` and ``label``.
        fit: e.g. ``fit_transform("train", model.pretrained_cfg)``.
        cache_dir: folder of the cache files.
        name: split name, the start of the file name (``train-<key>.safetensors``).
        on_decode_error: ``raise``, or ``skip``: an unreadable image is replaced by the next readable one and its
            row listed in ``skipped`` (as ``TransformedImageDataset``).
    """
    key = content_key(dataset, repr(fit))
    path = Path(cache_dir).expanduser() / f"{name}-{key[:32]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") == key:
                tensors = load_file(str(path))
                return DecodedSplit(tensors["images"], tensors["labels"], tensors["skipped"].tolist(), path, False)
            _logger.warning("%s holds another key: decoding %s again", path, name)
        except Exception as err:  # a damaged or truncated file: decode again and replace it
            _logger.warning("could not read the decoded-split cache %s (%s): decoding %s again", path, err, name)
    images, labels, skipped = _decode(dataset, fit, num_workers, on_decode_error)
    _write(path, images, labels, skipped, key, name)
    return DecodedSplit(images, labels, skipped, path, True)


def _decode(dataset: Any, fit: Callable[[Any], Any], num_workers: int, on_decode_error: str):
    source = TransformedImageDataset(dataset, T.Compose([fit, T.PILToTensor()]), on_decode_error=on_decode_error)
    loader = torch.utils.data.DataLoader(source, batch_size=256, shuffle=False, num_workers=num_workers)
    images, labels = [], []
    for batch in loader:
        images.append(batch["pixel_values"])
        labels.append(batch["label"])
    if not images:
        raise ValueError("cannot decode an empty split")
    return torch.cat(images).contiguous(), torch.cat(labels).long(), source.skipped


def _write(path: Path, images: torch.Tensor, labels: torch.Tensor, skipped: List[int], key: str,
           name: str) -> Optional[Path]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"images": images, "labels": labels, "skipped": torch.tensor(skipped, dtype=torch.long)}
        metadata = {"key": key, "split": name, "shape": "x".join(map(str, images.shape)), "format": FORMAT_VERSION}
        return files.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except OSError as err:  # a read-only or full disk: train anyway, decoding again next time
        _logger.warning("could not write the decoded-split cache %s: %s", path, err)
        return None
