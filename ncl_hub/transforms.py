"""Image transforms for NCL training and evaluation, built from torchvision and timm.

* ``cifar_train_transform``: the released CIFAR-LT pipeline: crop 32 pad 4, flip, AutoAugment (CIFAR10 policy),
  normalise, Cutout (1 hole, 16 px).
* ``imagenet_train_transform``: RandomResizedCrop, flip, colour jitter and RandAugment via timm.
* ``moco_key_transform``: the MoCo-v2 / SimCLR view used for the contrastive branch's keys.
* ``eval_transform``: timm's resize + centre crop + normalise from a model's ``pretrained_cfg``.
* ``TransformedImageDataset``: a map-style torch Dataset over a ``datasets.Dataset`` that decodes images inside
  DataLoader workers and yields ``{"pixel_values", "label", "index"}`` (plus ``"key_values"``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import str_to_interp_mode
from timm.data.transforms_factory import transforms_imagenet_train
from torchvision import transforms as T

__all__ = [
    "Cutout",
    "ImageDecodeError",
    "TRAIN_POLICIES",
    "TransformedImageDataset",
    "build_train_transform",
    "cifar_train_transform",
    "eval_transform",
    "imagenet_train_transform",
    "moco_key_transform",
]

_logger = logging.getLogger(__name__)

Size = Union[int, Sequence[int]]
Transform = Callable[[Any], torch.Tensor]


def _hw(input_size: Size) -> Tuple[int, int]:
    """(H, W) from an int, (H, W) or timm's (3, H, W)."""
    if isinstance(input_size, int):
        return input_size, input_size
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        size = size[1:]
    if len(size) != 2:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
    return size  # type: ignore[return-value]


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


def cifar_train_transform(mean: Sequence[float], std: Sequence[float], size: int = 32) -> T.Compose:
    """The released CIFAR-LT training pipeline (PIL image in, float tensor [3, size, size] out).

    RandomCrop(size, padding=4), RandomHorizontalFlip, AutoAugment(CIFAR10 policy), ToTensor, Normalize(mean, std),
    Cutout(1 hole, 16 px).
    """
    return T.Compose([
        T.RandomCrop(size, padding=4),
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
    """The ImageNet-LT / iNaturalist training pipeline via timm: RandomResizedCrop(scale), flip, ColorJitter,
    RandAugment (``auto_augment``, timm syntax), ToTensor, Normalize. Output: float tensor [3, H, W].

    timm's ``create_transform(is_training=True)`` drops colour jitter whenever RandAugment is on; the released
    NCL configs use both, so this calls the builder behind it, ``transforms_imagenet_train``, with
    ``force_color_jitter=True``.
    """
    return transforms_imagenet_train(
        img_size=_hw(input_size), scale=tuple(scale), color_jitter=color_jitter, force_color_jitter=True,
        auto_augment=auto_augment, interpolation=interpolation, mean=tuple(mean), std=tuple(std))


def _blur_kernel(size: int) -> int:
    k = int(0.1 * size)
    return max(3, k + 1 if k % 2 == 0 else k)


def moco_key_transform(input_size: Size, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The MoCo-v2 / SimCLR view for the contrastive keys (PIL in, float tensor [3, H, W] out).

    RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale(0.2),
    GaussianBlur (kernel about 10% of the side, odd, >= 3; sigma 0.1-2) with p 0.5, flip, ToTensor, Normalize.
    """
    h, w = _hw(input_size)
    return T.Compose([
        T.RandomResizedCrop((h, w), scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(_blur_kernel(min(h, w)), sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(pretrained_cfg: Mapping[str, Any]) -> T.Compose:
    """timm's evaluation pipeline for a model's ``pretrained_cfg``: Resize(side / crop_pct), CenterCrop(side),
    ToTensor, Normalize. For the CIFAR models (input 32, crop_pct 1.0) a 32x32 image passes unchanged to the
    normalisation. Output: float tensor [3, H, W].
    """
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    return create_transform(**config, is_training=False)


def _no_augment_transform(pretrained_cfg: Mapping[str, Any]) -> T.Compose:
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    h, w = _hw(config["input_size"])
    return T.Compose([
        T.Resize(min(h, w), interpolation=str_to_interp_mode(config["interpolation"])),
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(config["mean"], config["std"]),
    ])


def _cifar_policy(pretrained_cfg: Mapping[str, Any]) -> T.Compose:
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    return cifar_train_transform(config["mean"], config["std"], size=_hw(config["input_size"])[0])


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
        policy: ``"cifar"`` (``cifar_train_transform``), ``"randaugment"`` (``imagenet_train_transform``),
            ``"simclr"`` (``moco_key_transform``: the Places-LT recipe) or ``"none"`` (resize + centre crop to
            the input size, ToTensor, Normalize).
        pretrained_cfg: e.g. ``model.pretrained_cfg``.

    Returns:
        A transform from a PIL image to a float tensor [3, H, W].
    """
    if policy not in TRAIN_POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; valid policies: {', '.join(TRAIN_POLICIES)}")
    return TRAIN_POLICIES[policy](pretrained_cfg)


class ImageDecodeError(RuntimeError):
    """An image of the dataset could not be read or decoded; the message names its index."""


class TransformedImageDataset(torch.utils.data.Dataset):
    """A map-style torch Dataset over a ``datasets.Dataset`` with ``image`` and ``label`` columns.

    Images are decoded in ``__getitem__``, i.e. inside DataLoader worker processes, converted to RGB (grayscale,
    RGBA and palette inputs alike) and transformed. ``__getitem__(i)`` returns ``{"pixel_values": [3, H, W] float,
    "label": int, "index": int}`` (+ ``"key_values"``); ``index`` is that of the image returned, i.e. ``i`` unless
    it was skipped.

    Args:
        dataset: a ``datasets.Dataset`` (any format set on it is ignored).
        transform: PIL image -> float tensor [3, H, W].
        key_transform: if given, a second, independently augmented view ``"key_values"`` of the same image.
        on_decode_error: ``"raise"``: an image that cannot be read raises ``ImageDecodeError`` naming its index;
            ``"skip"``: return the next readable index instead (wrapping around) and record the unreadable one.

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
    ):
        if on_decode_error not in ("raise", "skip"):
            raise ValueError(f"on_decode_error must be 'raise' or 'skip', got {on_decode_error!r}")
        for column in ("image", "label"):
            if column not in dataset.column_names:
                raise ValueError(f"dataset needs an {column!r} column; columns found: {dataset.column_names}")
        self.dataset = dataset.with_format(None)
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
        from PIL import Image

        row = self.dataset[index]
        image = row["image"]
        if isinstance(image, dict):  # an Image(decode=False) column
            import datasets
            image = datasets.Image().decode_example(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        return image.convert("RGB"), int(row["label"])

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
                if self.on_decode_error == "raise":
                    raise ImageDecodeError(f"could not decode the image at dataset index {i}: "
                                           f"{type(err).__name__}: {err}") from err
                if not self._skipped_flags[i]:
                    _logger.warning("skipping unreadable image at dataset index %d: %s", i, err)
                self._skipped_flags[i] = True
        else:
            raise ImageDecodeError(f"no image of the {n} in the dataset could be decoded")
        sample = {"pixel_values": self.transform(image), "label": label, "index": i}
        if self.key_transform is not None:
            sample["key_values"] = self.key_transform(image)
        return sample
