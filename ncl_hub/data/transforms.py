"""Image transforms for NCL training and evaluation, built from torchvision and timm.

* ``to_rgb`` / ``ToRGB``: any PIL image as 3-channel 8-bit RGB, upright (the first step of every pipeline here).
* ``cifar_train_transform``: the released CIFAR-LT pipeline: crop 32 pad 4, flip, AutoAugment (CIFAR10 policy),
  normalise, Cutout (1 hole, 16 px), after fitting other image sizes to the input (resize, centre crop).
* ``imagenet_train_transform``: RandomResizedCrop, flip, colour jitter and RandAugment via timm.
* ``moco_key_transform``: the MoCo-v2 / SimCLR view used for the contrastive branch's keys.
* ``eval_transform``: timm's resize + centre crop + normalise from a model's ``pretrained_cfg``.
* ``TransformedImageDataset``: a map-style torch Dataset over a ``datasets.Dataset`` that decodes images inside
  DataLoader workers and yields ``{"pixel_values", "label", "index"}`` (plus ``"key_values"``).

Every pipeline takes images of any mode and any size: ``ToRGB`` first, then each brings the image to the model's
input size its own way (said in its docstring): a random resized crop (``randaugment``, ``simclr``, MoCo keys), or a
resize of the shorter side followed by a centre crop (``cifar`` before its 32 px crop-with-padding, ``none``, and
timm's evaluation transform, which resizes to ``side / crop_pct`` first).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Literal, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import str_to_interp_mode
from timm.data.transforms_factory import transforms_imagenet_train
from torchvision import transforms as T

from ..errors import UserError
from .checks import describe_row, open_image

__all__ = [
    "BACKGROUND",
    "Cutout",
    "ImageDecodeError",
    "decode_min_side",
    "load_stored_image",
    "ToRGB",
    "TRAIN_POLICIES",
    "TransformedImageDataset",
    "build_train_transform",
    "cifar_train_transform",
    "eval_transform",
    "imagenet_train_transform",
    "input_hw",
    "moco_key_transform",
    "to_rgb",
]

_logger = logging.getLogger(__name__)

Size = Union[int, Sequence[int]]
Transform = Callable[[Any], torch.Tensor]


def input_hw(input_size: Size) -> Tuple[int, int]:
    """(H, W) from an int, (H, W) or timm's (3, H, W)."""
    if isinstance(input_size, int):
        return input_size, input_size
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        size = size[1:]
    if len(size) != 2:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
    return size  # type: ignore[return-value]


# what transparent pixels are composited over: white, as an image viewer or a web page shows them (dropping the
# alpha channel instead would show whatever colour the transparent pixels happen to store, often black)
BACKGROUND: Tuple[int, int, int] = (255, 255, 255)
_ORIENTATION = 0x0112  # the EXIF orientation tag
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _to_8bit(image: Any) -> Any:
    """A 16-bit, 32-bit integer or float single-channel image as an 8-bit "L" image, scaled, never clipped."""
    from PIL import Image

    a = np.asarray(image)
    if image.mode.startswith("I;16"):  # 0..65535 -> 0..255, rounded
        a = (a.astype(np.uint32) * 255 + 32767) // 65535
    elif image.mode == "F" and a.size and np.nanmin(a) >= 0.0 and np.nanmax(a) <= 1.0:
        a = np.rint(np.nan_to_num(a) * 255.0)
    elif image.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535:  # 16-bit data kept in 32-bit ints
        a = (a.astype(np.int64) * 255 + 32767) // 65535
    else:  # anything else: stretch its own range to 0..255
        a = np.nan_to_num(a.astype(np.float64))
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        a = np.rint((a - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros_like(a)
    return Image.fromarray(a.astype(np.uint8), mode="L")


def to_rgb(image: Any, background: Tuple[int, int, int] = BACKGROUND) -> Any:
    """Any PIL image as an upright 3-channel 8-bit RGB image of the same size.

    * EXIF orientation: applied (``ImageOps.exif_transpose``), so a phone photo stored sideways comes out upright.
    * RGB: returned as it is (the same object).
    * Grayscale ``L``, 1-bit ``1``, palette ``P``, ``CMYK``, ``YCbCr``, ``HSV``: Pillow's conversion to RGB (grey
      values repeated in the three channels).
    * Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa`` / ``La``, and ``P``, ``L`` or ``RGB`` with a
      ``transparency`` entry): composited over ``background`` (default white, ``BACKGROUND``).
    * 16-bit ``I;16*``: scaled 0..65535 -> 0..255 (rounded). 32-bit ``I``: scaled the same way when its values lie
      in 0..65535 (16-bit data, as some decoders give it), else its own min..max is stretched to 0..255. Float
      ``F``: values in [0, 1] times 255, else min..max stretched. Never clipped.

    Args:
        image: a PIL image of any mode and size.
        background: RGB colour that transparent pixels are composited over.

    Returns:
        A PIL image in mode RGB.
    """
    from PIL import Image, ImageOps

    if image.getexif().get(_ORIENTATION, 1) not in (1, None):
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


class ToRGB(torch.nn.Module):
    """``to_rgb`` as a transform step: PIL image in, upright RGB PIL image out; anything else passes unchanged."""

    def __init__(self, background: Tuple[int, int, int] = BACKGROUND):
        super().__init__()
        self.background = tuple(background)

    def forward(self, img: Any) -> Any:
        from PIL import Image

        return to_rgb(img, self.background) if isinstance(img, Image.Image) else img

    def extra_repr(self) -> str:
        return f"background={self.background}"


def _with_rgb(transform: T.Compose) -> T.Compose:
    return T.Compose([ToRGB(), *transform.transforms])


class Cutout(torch.nn.Module):
    """Cutout (DeVries & Taylor 2017): zero ``num_holes`` squares of side ``length`` in a tensor image [C, H, W].

    Neither torchvision nor timm has it (RandomErasing samples area and aspect ratio instead), hence this
    class. Each hole's centre is uniform over the image and the square is clipped at the borders. Uses the
    torch RNG, which DataLoader seeds per worker.
    """

    def __init__(self, num_holes: int = 1, length: int = 16):
        super().__init__()
        self.num_holes = num_holes
        self.length = length

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        mask = torch.ones(h, w, dtype=img.dtype, device=img.device)
        for _ in range(self.num_holes):
            cy = int(torch.randint(h, ()))
            cx = int(torch.randint(w, ()))
            mask[max(0, cy - self.length // 2):min(h, cy + self.length // 2),
                 max(0, cx - self.length // 2):min(w, cx + self.length // 2)] = 0
        return img * mask

    def extra_repr(self) -> str:
        return f"num_holes={self.num_holes}, length={self.length}"


def cifar_train_transform(mean: Sequence[float], std: Sequence[float], size: Size = 32,
                          interpolation: str = "bilinear") -> T.Compose:
    """The released CIFAR-LT training pipeline (PIL image of any mode and size in, float tensor [3, H, W] out).

    ToRGB, Resize(shorter side to min(H, W), ``interpolation``), CenterCrop(H, W), then the released steps:
    RandomCrop((H, W), padding=4), RandomHorizontalFlip, AutoAugment(CIFAR10 policy), ToTensor, Normalize(mean, std),
    Cutout(1 hole, 16 px). The resize and centre crop fit any image to the input size first (a 40x28 or a 17x50
    image, a 500x375 photo), so that the 4-pixel-padded random crop always has room; a CIFAR image already at the
    input size passes through them unchanged.
    """
    h, w = input_hw(size)
    return T.Compose([
        ToRGB(),
        T.Resize(min(h, w), interpolation=str_to_interp_mode(interpolation)),
        T.CenterCrop((h, w)),
        T.RandomCrop((h, w), padding=4),
        T.RandomHorizontalFlip(),
        T.AutoAugment(T.AutoAugmentPolicy.CIFAR10),
        T.ToTensor(),
        T.Normalize(mean, std),
        Cutout(num_holes=1, length=16),
    ])


def imagenet_train_transform(
        input_size: Size,
        mean: Sequence[float],
        std: Sequence[float],
        auto_augment: Optional[str] = "rand-n2-m10-mstd0.5",
        interpolation: str = "bilinear",
        scale: Tuple[float, float] = (0.08, 1.0),
        color_jitter: Optional[float] = 0.4,
) -> T.Compose:
    """The ImageNet-LT / iNaturalist training pipeline via timm: ToRGB, RandomResizedCrop(scale), flip, ColorJitter,
    RandAugment (``auto_augment``, timm syntax), ToTensor, Normalize. Output: float tensor [3, H, W].

    Any image size works: the random resized crop takes a region of ``scale`` of the image's area and resizes it to
    (H, W), up or down. timm's ``create_transform(is_training=True)`` drops colour jitter whenever RandAugment is
    on; the released NCL configs use both, so this calls the builder behind it, ``transforms_imagenet_train``, with
    ``force_color_jitter=True``.
    """
    return _with_rgb(transforms_imagenet_train(
        img_size=input_hw(input_size), scale=tuple(scale), color_jitter=color_jitter, force_color_jitter=True,
        auto_augment=auto_augment, interpolation=interpolation, mean=tuple(mean), std=tuple(std)))


def _blur_kernel(size: int) -> int:
    k = int(0.1 * size)
    return max(3, k + 1 if k % 2 == 0 else k)


def moco_key_transform(input_size: Size, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The MoCo-v2 / SimCLR view for the contrastive keys (PIL image of any mode and size in, float tensor [3, H, W]
    out).

    ToRGB, RandomResizedCrop(scale 0.2-1; any image size is resized to (H, W)), ColorJitter(0.4, 0.4, 0.4, 0.1) with
    p 0.8, RandomGrayscale(0.2), GaussianBlur (kernel about 10% of the side, odd, >= 3; sigma 0.1-2) with p 0.5,
    flip, ToTensor, Normalize.
    """
    h, w = input_hw(input_size)
    return T.Compose([
        ToRGB(),
        T.RandomResizedCrop((h, w), scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(_blur_kernel(min(h, w)), sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(pretrained_cfg: Mapping[str, Any]) -> T.Compose:
    """timm's evaluation pipeline for a model's ``pretrained_cfg``, after ToRGB: Resize(shorter side to
    side / crop_pct), CenterCrop(side), ToTensor, Normalize. Any image size works (smaller images are upsampled).
    For the CIFAR models (input 32, crop_pct 1.0) a 32x32 image passes unchanged to the normalisation.
    Output: float tensor [3, H, W].
    """
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    return _with_rgb(create_transform(**config, is_training=False))


def _no_augment_transform(pretrained_cfg: Mapping[str, Any]) -> T.Compose:
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    h, w = input_hw(config["input_size"])
    return T.Compose([
        ToRGB(),
        T.Resize(min(h, w), interpolation=str_to_interp_mode(config["interpolation"])),
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(config["mean"], config["std"]),
    ])


def _cifar_policy(pretrained_cfg: Mapping[str, Any]) -> T.Compose:
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    return cifar_train_transform(config["mean"], config["std"], size=config["input_size"],
                                 interpolation=config["interpolation"])


def _randaugment_policy(pretrained_cfg: Mapping[str, Any]) -> T.Compose:
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    return imagenet_train_transform(config["input_size"], config["mean"], config["std"],
                                    interpolation=config["interpolation"])


def _simclr_policy(pretrained_cfg: Mapping[str, Any]) -> T.Compose:
    # the released Places-LT recipe: RandomResizedCrop, colour jitter, grayscale, blur, flip (no RandAugment)
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    return moco_key_transform(config["input_size"], config["mean"], config["std"])


TRAIN_POLICIES: Dict[str, Callable[[Mapping[str, Any]], T.Compose]] = {
    "cifar": _cifar_policy,
    "randaugment": _randaugment_policy,
    "simclr": _simclr_policy,
    "none": _no_augment_transform,
}


def build_train_transform(policy: str, pretrained_cfg: Mapping[str, Any]) -> T.Compose:
    """The training transform ``policy`` for a model's ``pretrained_cfg`` (input_size, interpolation, mean, std).

    Args:
        policy: ``"cifar"`` (``cifar_train_transform``: resize + centre crop to the input size, then the released
            32 px steps), ``"randaugment"`` (``imagenet_train_transform``), ``"simclr"`` (``moco_key_transform``:
            the Places-LT recipe) or ``"none"`` (resize the shorter side + centre crop to the input size, ToTensor,
            Normalize). Every policy starts with ``ToRGB``.
        pretrained_cfg: e.g. ``model.pretrained_cfg``.

    Returns:
        A transform from a PIL image (any mode, any size) to a float tensor [3, H, W].
    """
    if policy not in TRAIN_POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; valid policies: {', '.join(TRAIN_POLICIES)}")
    return TRAIN_POLICIES[policy](pretrained_cfg)


class ImageDecodeError(UserError, RuntimeError):
    """An image of the dataset could not be read or decoded; the message names it (its path, or split and row)."""


def _undecoded(dataset: Any) -> Any:
    """``dataset`` (format reset) with its ``image`` column as stored ``{bytes, path}`` (a feature change only: no
    data is copied), so that :class:`TransformedImageDataset` decodes each image itself, at the size it needs."""
    import datasets

    dataset = dataset.with_format(None)
    feature = dataset.features.get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


def decode_min_side(pretrained_cfg: Mapping[str, Any]) -> int:
    """The shorter side a JPEG is never decoded below for a model (4 x its input side): enough for any crop of the
    training and evaluation policies, and a 12-megapixel photo for a 224 px model is decoded at half size."""
    return 4 * max(input_hw(pretrained_cfg.get("input_size", 224)))


def load_stored_image(stored: Any, min_side: Optional[int] = None) -> Any:
    """A PIL image from a stored ``{bytes, path}`` (or a PIL image, returned as it is): bytes, else a local file,
    decoded by :func:`ncl_hub.data.checks.open_image` (a large JPEG at reduced size, never below ``min_side``);
    other paths (remote files) through ``datasets``."""
    from PIL import Image

    if isinstance(stored, Image.Image):
        return stored
    if not isinstance(stored, dict):
        raise TypeError(f"expected a PIL image or {{bytes, path}}, got {type(stored).__name__}")
    data, path = stored.get("bytes"), stored.get("path")
    if data is not None:
        return open_image(data, min_side=min_side)
    if path and os.path.isfile(path):
        return open_image(path, min_side=min_side)
    import datasets

    return datasets.Image().decode_example(stored)


class TransformedImageDataset(torch.utils.data.Dataset):
    """A map-style torch Dataset over a ``datasets.Dataset`` with ``image`` and ``label`` columns.

    Images are decoded in ``__getitem__``, i.e. inside DataLoader worker processes (a JPEG much larger than the
    model needs at reduced size, its shorter side kept at least ``min_side``), made upright 3-channel RGB by
    ``to_rgb`` (grayscale, alpha, palette, CMYK, 16-bit and EXIF-rotated inputs alike) and transformed.
    ``__getitem__(i)`` returns ``{"pixel_values": [3, H, W] float, "label": int, "index": int}`` (+ ``"key_values"``);
    ``index`` is that of the image returned, i.e. ``i`` unless it was skipped.

    Args:
        dataset: a ``datasets.Dataset`` (any format set on it is ignored).
        transform: PIL image -> float tensor [3, H, W].
        key_transform: if given, a second, independently augmented view ``"key_values"`` of the same image.
        on_decode_error: ``"raise"``: an image that cannot be read raises ``ImageDecodeError`` naming it;
            ``"skip"``: log it by name, return the next readable index instead (wrapping around) and record it.
        min_side: shorter side below which a JPEG is never reduced at decode time (None: full size).
        split: the split's name, used to name an unreadable image stored inside the dataset.

    ``skipped`` lists the unreadable indices met so far. The flags live in a shared-memory tensor, so indices
    skipped inside DataLoader workers show up in the main process too (best effort: read it after the epoch;
    a copy made by plain ``pickle`` does not share them).
    """

    def __init__(
            self,
            dataset: Any,
            transform: Transform,
            key_transform: Optional[Transform] = None,
            on_decode_error: Literal["raise", "skip"] = "raise",
            min_side: Optional[int] = None,
            split: str = "data",
    ):
        if on_decode_error not in ("raise", "skip"):
            raise ValueError(f"on_decode_error must be 'raise' or 'skip', got {on_decode_error!r}")
        for column in ("image", "label"):
            if column not in dataset.column_names:
                raise ValueError(f"dataset needs an {column!r} column; columns found: {dataset.column_names}")
        self.dataset = _undecoded(dataset)
        self.min_side, self.split = min_side, split
        self.transform = transform
        self.key_transform = key_transform
        self.on_decode_error = on_decode_error
        self._skipped_flags = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> list:
        """Dataset indices whose image could not be decoded and was replaced (``on_decode_error="skip"``)."""
        return torch.nonzero(self._skipped_flags).flatten().tolist()

    def _load(self, index: int) -> Tuple[Any, int]:
        row = self.dataset[index]
        return to_rgb(load_stored_image(row["image"], self.min_side)), int(row["label"])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image, label = self._load(i)
                break
            except Exception as err:  # PIL raises UnidentifiedImageError, OSError, ValueError... for bad files
                where = describe_row(self.dataset, self.split, i)
                if self.on_decode_error == "raise":
                    raise ImageDecodeError(f"could not decode {where} (dataset index {i}): "
                                           f"{type(err).__name__}: {err}") from err
                if not self._skipped_flags[i]:
                    _logger.warning("skipping unreadable image %s (dataset index %d): %s", where, i, err)
                self._skipped_flags[i] = True
        else:
            raise ImageDecodeError(f"no image of the {n} in the dataset could be decoded")
        sample = {"pixel_values": self.transform(image), "label": label, "index": i}
        if self.key_transform is not None:
            sample["key_values"] = self.key_transform(image)
        return sample
