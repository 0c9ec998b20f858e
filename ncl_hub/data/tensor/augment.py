"""The released CIFAR training augmentation on batches of uint8 image tensors, with per-sample random parameters.

``data.transforms.cifar_train_transform`` augments one PIL image at a time in DataLoader workers. This module does the
same steps on a whole batch ``[B, 3, H, W]`` (uint8, on any device) as tensor operations, each sample with its own
parameters: crop with 4 px zero padding, horizontal flip, AutoAugment (CIFAR10 policy), normalisation, Cutout (1
hole, 16 px). ``torchvision.transforms.v2.functional`` applies one parameter to a whole batch, so the operations are
written here with a parameter per sample ``[B]``; AutoAugment groups the samples by the operation each one drew.

Every operation reproduces Pillow's arithmetic on 8-bit images, which is what the PIL path runs:

* geometry (crop, Rotate, ShearX/Y, TranslateX/Y): Pillow's nearest-neighbour affine transform, including its
  16.16 fixed-point coordinates (``affine_nearest``): equal to the PIL path pixel for pixel;
* Brightness, Color, Contrast, Sharpness: Pillow's ``Image.blend`` in float32, clipped and truncated, with its
  degenerate images (black; ITU-R 601 grey with Pillow's integer weights; the rounded mean grey; the SMOOTH filter
  rounded, border kept);
* Posterize, Solarize, AutoContrast, Equalize, Invert: Pillow's lookup tables, computed per sample and channel.

The random parameters are drawn on the CPU from a ``torch.Generator`` (``draw_cifar_params``), so a stream is the same
on every device; ``augment_cifar`` then runs on the device the images are on, with no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "AUTOAUGMENT_OPS", "CifarAugmentParams", "affine_nearest", "augment_cifar", "autoaugment_policy", "autocontrast",
    "brightness", "color", "contrast", "crop_with_padding", "cutout", "draw_cifar_params", "equalize", "hflip",
    "invert", "normalize", "posterize", "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x",
    "translate_y",
]

Tensor = torch.Tensor


def _per_sample(values: Tensor, images: Tensor, dtype=torch.float32) -> Tensor:
    """Parameters [B] as [B, 1, 1, 1] on the images' device."""
    return values.to(device=images.device, dtype=dtype).view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------- geometry
def affine_nearest(images: Tensor, matrix: Tensor) -> Tensor:
    """Pillow's ``Image.transform(AFFINE, matrix, NEAREST)`` of every image, black outside.

    Args:
        images: uint8 [B, C, H, W].
        matrix: [B, 6] inverse affine coefficients (a, b, c, d, e, f) per image, as Pillow takes them: output pixel
            (x, y) reads input pixel (a x + b y + c, d x + e y + f), with (x, y) the pixel centre.

    Returns:
        uint8 [B, C, H, W].

    Coordinates are computed in Pillow's 16.16 fixed point (the path it takes for images under 32768 px), so the
    result equals Pillow's exactly, ties included.
    """
    n, c, h, w = images.shape
    m = matrix.to(device=images.device, dtype=torch.float64)

    def fix(v: Tensor) -> Tensor:
        return torch.floor(v * 65536.0 + 0.5).long().view(n, 1, 1)

    a0, a1, a3, a4 = fix(m[:, 0]), fix(m[:, 1]), fix(m[:, 3]), fix(m[:, 4])
    a2 = fix(m[:, 2] + m[:, 0] * 0.5 + m[:, 1] * 0.5)
    a5 = fix(m[:, 5] + m[:, 3] * 0.5 + m[:, 4] * 0.5)
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    x_in = (a2 + ys * a1 + xs * a0) >> 16  # floor division by 65536, as Pillow's arithmetic shift
    y_in = (a5 + ys * a4 + xs * a3) >> 16
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    flat = (y_in.clamp(0, h - 1) * w + x_in.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = images.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)
    return out * inside.unsqueeze(1).to(out.dtype)


def _shift_matrix(dx: Tensor, dy: Tensor) -> Tensor:
    """Inverse matrices [B, 6] of a shift by (dx, dy) pixels (the content moves right / down)."""
    one, zero = torch.ones_like(dx, dtype=torch.float64), torch.zeros_like(dx, dtype=torch.float64)
    return torch.stack([one, zero, -dx.double(), zero, one, -dy.double()], 1)


def crop_with_padding(images: Tensor, top: Tensor, left: Tensor, padding: int = 4) -> Tensor:
    """``RandomCrop(size, padding)`` at given offsets: zero-pad by ``padding`` and take the [H, W] window whose
    top-left corner is (``top``, ``left``) [B] in the padded image (each in 0..2 * padding)."""
    return affine_nearest(images, _shift_matrix(padding - left, padding - top))


def hflip(images: Tensor, flip: Tensor) -> Tensor:
    """Mirror the images where ``flip`` [B] (bool) is set."""
    return torch.where(_per_sample(flip, images, torch.bool), images.flip(-1), images)


def translate_x(images: Tensor, pixels: Tensor) -> Tensor:
    """AutoAugment TranslateX: shift right by ``int(pixels)`` [B] (truncated toward zero, as torchvision)."""
    return affine_nearest(images, _shift_matrix(torch.trunc(pixels.double()), torch.zeros_like(pixels)))


def translate_y(images: Tensor, pixels: Tensor) -> Tensor:
    """AutoAugment TranslateY: shift down by ``int(pixels)`` [B]."""
    return affine_nearest(images, _shift_matrix(torch.zeros_like(pixels), torch.trunc(pixels.double())))


def _shear_factor(magnitude: Tensor) -> Tensor:
    # torchvision passes shear=degrees(atan(m)) and its inverse matrix takes tan(radians(.)) of it again
    return torch.tan(torch.deg2rad(torch.rad2deg(torch.atan(magnitude.double()))))


def shear_x(images: Tensor, magnitude: Tensor) -> Tensor:
    """AutoAugment ShearX about the top-left corner: x_in = x + m y, per sample m [B]."""
    s = _shear_factor(magnitude)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return affine_nearest(images, torch.stack([one, s, zero, zero, one, zero], 1))


def shear_y(images: Tensor, magnitude: Tensor) -> Tensor:
    """AutoAugment ShearY about the top-left corner: y_in = m x + y, per sample m [B]."""
    s = _shear_factor(magnitude)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return affine_nearest(images, torch.stack([one, zero, zero, s, one, zero], 1))


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """AutoAugment Rotate: counter-clockwise by ``degrees`` [B] about the image centre (Pillow's ``rotate``)."""
    h, w = images.shape[-2:]
    a = -torch.deg2rad(torch.remainder(degrees.double(), 360.0))
    cos, sin = torch.round(torch.cos(a), decimals=15), torch.round(torch.sin(a), decimals=15)
    cx, cy = w / 2.0, h / 2.0
    return affine_nearest(images, torch.stack(
        [cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], 1))


# ---------------------------------------------------------------------------------------------- colour
def _blend(degenerate: Tensor, images: Tensor, factor: Tensor) -> Tensor:
    """Pillow's ``Image.blend(degenerate, image, factor)``: float32 arithmetic, clipped to 0..255, truncated."""
    d = degenerate.float()
    out = d + _per_sample(factor.double(), images) * (images.float() - d)
    return out.clamp_(0, 255).to(torch.uint8)


def _grey(images: Tensor) -> Tensor:
    """Pillow's RGB -> L conversion (ITU-R 601-2 weights in 16-bit fixed point) [B, 1, H, W], int32."""
    rgb = images.int()
    return (rgb[:, 0:1] * 19595 + rgb[:, 1:2] * 38470 + rgb[:, 2:3] * 7471 + 0x8000) >> 16


def brightness(images: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Brightness(img).enhance(factor)`` per sample (blend with black)."""
    return _blend(torch.zeros_like(images), images, factor)


def color(images: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Color(img).enhance(factor)`` per sample (blend with the image's grey version)."""
    return _blend(_grey(images).expand_as(images), images, factor)


def contrast(images: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Contrast(img).enhance(factor)`` per sample (blend with the rounded mean grey)."""
    mean = _grey(images).double().mean((1, 2, 3), keepdim=True)
    return _blend(torch.floor(mean + 0.5).expand_as(images), images, factor)


def sharpness(images: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Sharpness(img).enhance(factor)`` per sample: blend with Pillow's SMOOTH filter (3x3 kernel
    1 1 1 / 1 5 1 / 1 1 1 over 13, rounded; the one-pixel border left as it is)."""
    n, c, h, w = images.shape
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=images.device) / 13.0
    smooth = torch.nn.functional.conv2d(images.float().view(n * c, 1, h, w), kernel.view(1, 1, 3, 3))
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = torch.floor(smooth.view(n, c, h - 2, w - 2) + 0.5).clamp_(0, 255).to(torch.uint8)
    return _blend(degenerate, images, factor)


def posterize(images: Tensor, bits: Tensor) -> Tensor:
    """``ImageOps.posterize`` per sample: keep the ``bits`` [B] (1..8) highest bits of every value."""
    mask = (255 - (2 ** (8 - bits.long()) - 1)).to(torch.uint8)
    return images & _per_sample(mask, images, torch.uint8)


def solarize(images: Tensor, threshold: Tensor) -> Tensor:
    """``ImageOps.solarize`` per sample: invert the values >= ``threshold`` [B]."""
    return torch.where(images.float() >= _per_sample(threshold, images), 255 - images, images)


def invert(images: Tensor, magnitude: Optional[Tensor] = None) -> Tensor:
    """``ImageOps.invert``: 255 - x (``magnitude`` is ignored)."""
    return 255 - images


def autocontrast(images: Tensor, magnitude: Optional[Tensor] = None) -> Tensor:
    """``ImageOps.autocontrast`` (no cutoff) of every image and channel: stretch min..max to 0..255 with Pillow's
    table ``int(v * 255 / (hi - lo) - lo * 255 / (hi - lo))``; a flat channel is left as it is."""
    x = images.double()
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    # a true division: torch computes `255.0 / tensor` as 255 * (1 / tensor), which rounds differently from Pillow
    scale = torch.full_like(hi, 255.0) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    out = torch.trunc(x * scale - lo * scale).clamp_(0, 255).to(torch.uint8)
    return torch.where(hi > lo, out, images)


def equalize(images: Tensor, magnitude: Optional[Tensor] = None) -> Tensor:
    """``ImageOps.equalize`` of every image and channel, Pillow's table: with the histogram h and the count of the
    last non-empty bin h_last, step = (N - h_last) // 255 and value v -> (step // 2 + sum(h[:v])) // step (clipped
    to 255); a channel with one value or step 0 is left as it is."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=images.device).scatter_add_(1, flat, torch.ones_like(flat))
    nonzero = hist > 0
    last_bin = 255 - nonzero.flip(1).long().argmax(1, keepdim=True)
    step = (h * w - hist.gather(1, last_bin)) // 255  # [n*c, 1]
    before = torch.cumsum(hist, 1) - hist  # pixels below each value
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp_(0, 255)
    keep = (nonzero.sum(1, keepdim=True) <= 1) | (step == 0)
    out = torch.where(keep, flat, lut.gather(1, flat))
    return out.to(torch.uint8).view(n, c, h, w)


# ---------------------------------------------------------------------------------------------- the CIFAR policy
# name -> operation(images uint8 [b, 3, H, W], magnitude [b] as AutoAugment's _apply_op receives it)
AUTOAUGMENT_OPS: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
    "Brightness": lambda x, m: brightness(x, 1.0 + m.double()),
    "Color": lambda x, m: color(x, 1.0 + m.double()),
    "Contrast": lambda x, m: contrast(x, 1.0 + m.double()),
    "Sharpness": lambda x, m: sharpness(x, 1.0 + m.double()),
    "Posterize": lambda x, m: posterize(x, m.long()),
    "Solarize": solarize,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": invert,
}
_OP_NAMES: List[str] = list(AUTOAUGMENT_OPS)


def autoaugment_policy(size: Tuple[int, int]) -> Dict[str, Tensor]:
    """torchvision's AutoAugment CIFAR10 policy as tensors, for images of ``size`` (H, W): its 25 sub-policies of two
    operations each, read from ``torchvision.transforms.AutoAugment`` (table and magnitude bins, not copied).

    Returns:
        ``op`` [25, 2] int64 (index into ``AUTOAUGMENT_OPS``), ``prob`` [25, 2] float64, ``magnitude`` [25, 2]
        float64 (the bin's value, 0 for operations without one), ``signed`` [25, 2] bool (a random sign applies).
    """
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    aa = AutoAugment(AutoAugmentPolicy.CIFAR10)
    space = aa._augmentation_space(10, tuple(size))  # torchvision's magnitude bins, the ones the PIL path uses
    op, prob, magnitude, signed = [], [], [], []
    for sub in aa.policies:
        for name, p, bin_id in sub:
            values, is_signed = space[name]
            op.append(_OP_NAMES.index(name))
            prob.append(p)
            magnitude.append(float(values[bin_id].item()) if bin_id is not None else 0.0)
            signed.append(is_signed)
    shape = (len(aa.policies), 2)
    return {"op": torch.tensor(op).view(shape), "prob": torch.tensor(prob, dtype=torch.float64).view(shape),
            "magnitude": torch.tensor(magnitude, dtype=torch.float64).view(shape),
            "signed": torch.tensor(signed).view(shape)}


@dataclass
class CifarAugmentParams:
    """The random parameters of ``augment_cifar`` for N samples (CPU tensors, first dimension N)."""

    top: Tensor  # [N] int64, crop window offset in the padded image, 0..2 * padding
    left: Tensor  # [N] int64
    flip: Tensor  # [N] bool
    op: Tensor  # [N, 2] int64: the AutoAugment operation of each slot (index into AUTOAUGMENT_OPS), -1 = none
    magnitude: Tensor  # [N, 2] float64, signed
    cutout_y: Tensor  # [N] int64, centre of the Cutout square, 0..H-1
    cutout_x: Tensor  # [N] int64, 0..W-1

    def __len__(self) -> int:
        return self.top.shape[0]

    def __getitem__(self, rows: slice) -> "CifarAugmentParams":
        return CifarAugmentParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def draw_cifar_params(n: int, size: Tuple[int, int], generator: torch.Generator,
                      padding: int = 4) -> CifarAugmentParams:
    """Draw the parameters of ``n`` samples, with the distributions of the PIL path's transforms: crop offsets
    uniform in 0..2 * padding (``RandomCrop``), flip with p 0.5, a uniform sub-policy whose two operations each apply
    with their probability and, where signed, a random sign (``AutoAugment.get_params``), a uniform Cutout centre.

    ``generator`` is a CPU generator: the draw is the same on every device.
    """
    h, w = size
    policy = autoaugment_policy(size)
    g = dict(generator=generator)
    top = torch.randint(0, 2 * padding + 1, (n,), **g)
    left = torch.randint(0, 2 * padding + 1, (n,), **g)
    flip = torch.rand(n, **g) < 0.5
    sub = torch.randint(len(policy["op"]), (n,), **g)
    probs = torch.rand(n, 2, dtype=torch.float64, **g)
    negative = torch.randint(2, (n, 2), **g) == 0  # AutoAugment negates when its sign draw is 0
    applied = probs <= policy["prob"][sub]
    op = torch.where(applied, policy["op"][sub], torch.full_like(policy["op"][sub], -1))
    magnitude = policy["magnitude"][sub] * torch.where(policy["signed"][sub] & negative, -1.0, 1.0)
    cutout_y = torch.randint(h, (n,), **g)
    cutout_x = torch.randint(w, (n,), **g)
    return CifarAugmentParams(top=top, left=left, flip=flip, op=op, magnitude=magnitude, cutout_y=cutout_y,
                              cutout_x=cutout_x)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [B, C, H, W] -> float32 ``(x / 255 - mean) / std`` (``ToTensor`` then ``Normalize``)."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.float().div_(255).sub_(m).div_(s)


def cutout(images: Tensor, centre_y: Tensor, centre_x: Tensor, length: int = 16) -> Tensor:
    """Cutout (``data.transforms.Cutout``, one hole) at given centres [B]: zero rows cy - L/2 .. cy + L/2 - 1 and
    the same columns around cx, clipped at the borders."""
    h, w = images.shape[-2:]
    half = length // 2
    cy, cx = _per_sample(centre_y, images, torch.long), _per_sample(centre_x, images, torch.long)
    ys = torch.arange(h, device=images.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, 1, w)
    hole = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
    return images * (~hole).to(images.dtype)


def augment_cifar(images: Tensor, params: CifarAugmentParams, mean: Sequence[float], std: Sequence[float],
                  padding: int = 4, cutout_length: int = 16) -> Tensor:
    """The released CIFAR training augmentation of a batch, with each sample's own parameters: crop with padding,
    flip, AutoAugment CIFAR10, normalise, Cutout (``data.transforms.cifar_train_transform`` after its resize).

    Args:
        images: uint8 [B, 3, H, W] on any device.
        params: ``draw_cifar_params`` for these B samples (CPU tensors).
        mean, std: per-channel normalisation.

    Returns:
        float32 [B, 3, H, W] on the images' device.

    AutoAugment groups the samples by the operation each one drew: per slot, every operation runs once on the
    samples that drew it (index lists made on the CPU, so there is no host synchronisation on a GPU).
    """
    x = crop_with_padding(images, params.top, params.left, padding)
    x = hflip(x, params.flip)
    for slot in range(params.op.shape[1]):
        ops = params.op[:, slot]
        for k in torch.unique(ops[ops >= 0]).tolist():
            rows = torch.nonzero(ops == k).flatten()
            on_device = rows.to(x.device, non_blocking=True)
            x.index_copy_(0, on_device, AUTOAUGMENT_OPS[_OP_NAMES[k]](x.index_select(0, on_device),
                                                                      params.magnitude[rows, slot]))
    return cutout(normalize(x, mean, std), params.cutout_y, params.cutout_x, cutout_length)
