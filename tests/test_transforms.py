import pickle

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

import ncl_hub  # noqa: F401  (registers the CIFAR models with timm)
from ncl_hub.data.transforms import (
    BACKGROUND, Cutout, ImageDecodeError, ToRGB, TransformedImageDataset, build_train_transform, cifar_train_transform,
    eval_transform, imagenet_train_transform, moco_key_transform, to_rgb,
)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR_CFG = timm.models.get_pretrained_cfg("resnet32_cifar").to_dict()
IMAGENET_CFG = dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _image(seed: int = 0, size: int = 32, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _dataset(n: int = 8, corrupt=()) -> datasets.Dataset:
    images = []
    for i in range(n):
        if i in corrupt:
            images.append({"bytes": b"these bytes are not an image", "path": None})
        else:
            images.append(_image(i, mode=("RGB", "L", "RGBA", "P")[i % 4]))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)


@pytest.mark.parametrize("make", [
    lambda: cifar_train_transform(MEAN, STD),
    lambda: imagenet_train_transform(32, MEAN, STD),
    lambda: moco_key_transform(32, MEAN, STD),
    lambda: eval_transform(CIFAR_CFG),
    lambda: build_train_transform("cifar", CIFAR_CFG),
    lambda: build_train_transform("randaugment", CIFAR_CFG),
    lambda: build_train_transform("none", CIFAR_CFG),
])
def test_transform_shape_and_dtype(make):
    torch.manual_seed(0)
    out = make()(_image())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_imagenet_sized_outputs():
    img = _image()
    assert eval_transform(IMAGENET_CFG)(img).shape == (3, 224, 224)
    assert build_train_transform("randaugment", IMAGENET_CFG)(img).shape == (3, 224, 224)
    assert build_train_transform("none", IMAGENET_CFG)(img).shape == (3, 224, 224)
    assert moco_key_transform((3, 64, 48), MEAN, STD)(img).shape == (3, 64, 48)


def test_cifar_eval_transform_is_normalisation_only():
    img = _image(3)
    expected = T.Normalize(MEAN, STD)(T.ToTensor()(img))
    assert torch.equal(eval_transform(CIFAR_CFG)(img), expected)


def test_pipelines_hold_the_documented_steps():
    cifar = [type(t) for t in cifar_train_transform(MEAN, STD).transforms]
    # fit any image to 32 px first, then the released steps
    assert cifar == [ToRGB, T.Resize, T.CenterCrop, T.RandomCrop, T.RandomHorizontalFlip, T.AutoAugment, T.ToTensor,
                     T.Normalize, Cutout]
    names = " ".join(type(t).__name__ for t in imagenet_train_transform(224, MEAN, STD).transforms)
    for step in ("ToRGB", "RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "ColorJitter", "Normalize"):
        assert step in names
    assert isinstance(eval_transform(CIFAR_CFG).transforms[0], ToRGB)
    key = moco_key_transform(224, MEAN, STD).transforms[1:]  # after ToRGB
    blur = key[3].transforms[0]
    assert isinstance(blur, T.GaussianBlur) and tuple(blur.kernel_size) == (23, 23)
    assert tuple(moco_key_transform(32, MEAN, STD).transforms[4].transforms[0].kernel_size) == (3, 3)
    assert key[0].scale == (0.2, 1.0) and key[1].p == 0.8 and key[2].p == 0.2 and key[3].p == 0.5


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(0)
    cutout = Cutout(num_holes=1, length=16)
    for _ in range(50):
        zeros = int((cutout(torch.ones(3, 32, 32))[0] == 0).sum())
        assert 8 * 8 <= zeros <= 16 * 16  # centre inside the image: at least a quarter of the square survives


def test_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError, match="cifar, randaugment, simclr, none"):
        build_train_transform("autoaugment", CIFAR_CFG)


def test_dataset_sample_and_rgb_conversion():
    ds = TransformedImageDataset(_dataset(4), eval_transform(CIFAR_CFG))
    for i in range(4):  # RGB, L, RGBA, P sources
        sample = ds[i]
        assert sample["pixel_values"].shape == (3, 32, 32) and sample["pixel_values"].dtype == torch.float32
        assert sample["label"] == i % 3 and sample["index"] == i
        assert "key_values" not in sample


def test_key_view_differs_from_query_view():
    torch.manual_seed(0)
    ds = TransformedImageDataset(_dataset(2), cifar_train_transform(MEAN, STD),
                                 key_transform=moco_key_transform(32, MEAN, STD))
    sample = ds[0]
    assert sample["key_values"].shape == sample["pixel_values"].shape == (3, 32, 32)
    assert not torch.equal(sample["key_values"], sample["pixel_values"])
    # the same key transform twice gives two different augmentations too
    assert not torch.equal(ds[0]["key_values"], sample["key_values"])


def test_dataloader_with_two_workers():
    ds = TransformedImageDataset(_dataset(8), build_train_transform("cifar", CIFAR_CFG),
                                 key_transform=moco_key_transform(32, MEAN, STD))
    pickle.loads(pickle.dumps(ds))
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["pixel_values"].shape == (4, 3, 32, 32) and batches[0]["key_values"].shape == (4, 3, 32, 32)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(8))
    assert torch.cat([b["label"] for b in batches]).tolist() == [i % 3 for i in range(8)]


def test_corrupt_image_raises_with_its_index():
    ds = TransformedImageDataset(_dataset(6, corrupt={3}), eval_transform(CIFAR_CFG))
    assert ds[2]["index"] == 2
    with pytest.raises(ImageDecodeError, match="dataset index 3"):
        ds[3]


def test_corrupt_image_is_skipped_and_counted():
    ds = TransformedImageDataset(_dataset(6, corrupt={3, 5}), eval_transform(CIFAR_CFG), on_decode_error="skip")
    assert ds[3]["index"] == 4
    assert ds[5]["index"] == 0  # wraps around
    assert ds.skipped == [3, 5]


def test_skipped_indices_are_seen_after_worker_iteration():
    ds = TransformedImageDataset(_dataset(8, corrupt={2, 7}), eval_transform(CIFAR_CFG), on_decode_error="skip")
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 3, 3, 4, 5, 6, 0]
    assert ds.skipped == [2, 7]


def test_bad_option():
    with pytest.raises(ValueError, match="on_decode_error"):
        TransformedImageDataset(_dataset(2), eval_transform(CIFAR_CFG), on_decode_error="ignore")


# ---------------------------------------------------------------------------------------------- any image
def test_to_rgb_per_mode():
    gray = Image.new("L", (4, 3), 77)
    assert to_rgb(gray).mode == "RGB" and to_rgb(gray).getpixel((0, 0)) == (77, 77, 77)
    rgb = Image.new("RGB", (4, 3), (1, 2, 3))
    assert to_rgb(rgb) is rgb  # nothing to do: the same object
    # transparency is composited over the background (white by default), not dropped
    assert to_rgb(Image.new("RGBA", (4, 3), (255, 0, 0, 0))).getpixel((0, 0)) == BACKGROUND == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (4, 3), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("RGBA", (4, 3), (0, 0, 0, 128))).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("LA", (4, 3), (0, 0)), background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    palette = Image.new("P", (4, 3), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    out = to_rgb(palette)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)
    assert to_rgb(Image.new("CMYK", (4, 3), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("1", (4, 3), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_scales_high_bit_depths_instead_of_clipping():
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(values)))  # I;16
    assert out[0, :, 0].tolist() == [0, 4, 128, 255] and (out[..., 0] == out[..., 2]).all()
    as_int32 = np.asarray(to_rgb(Image.fromarray(values.astype(np.int32))))  # I holding 16-bit data
    assert as_int32[0, :, 0].tolist() == [0, 4, 128, 255]
    wide = np.asarray(to_rgb(Image.fromarray(np.array([[-100, 0, 155]], dtype=np.int32))))  # stretched
    assert wide[0, :, 0].tolist() == [0, 100, 255]
    unit = np.asarray(to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))))
    assert unit[0, :, 0].tolist() == [0, 128, 255]


def test_to_rgb_applies_exif_orientation():
    import io

    from real_world import ORIENTATION

    img = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = img.getexif()
    exif[ORIENTATION] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    photo = Image.open(io.BytesIO(buf.getvalue()))
    assert photo.size == (40, 20)
    upright = to_rgb(photo)
    assert upright.size == (20, 40) and to_rgb(upright).size == (20, 40)  # applied once


@pytest.mark.parametrize("policy", ["cifar", "randaugment", "simclr", "none", "eval", "moco_key"])
def test_every_mode_and_size_becomes_the_input_size(policy):
    """The pipelines take what decoders give: the CIFAR policy used to fail on images under 32 px with
    'Required crop size (32, 32) is larger than input image size'."""
    from real_world import odd_images

    if policy == "eval":
        tf, imagenet_tf = eval_transform(CIFAR_CFG), eval_transform(IMAGENET_CFG)
    elif policy == "moco_key":
        tf, imagenet_tf = moco_key_transform(32, MEAN, STD), moco_key_transform(224, MEAN, STD)
    else:
        tf, imagenet_tf = build_train_transform(policy, CIFAR_CFG), build_train_transform(policy, IMAGENET_CFG)
    torch.manual_seed(0)
    for name, (img, _, _) in odd_images().items():
        out = tf(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all(), name
        assert imagenet_tf(img).shape == (3, 224, 224), name


def test_cifar_policy_is_unchanged_for_cifar_images():
    """Fitting other sizes first leaves a 32x32 image to the released steps, bit for bit."""
    img = _image(5)
    torch.manual_seed(3)
    ours = cifar_train_transform(MEAN, STD)(img)
    torch.manual_seed(3)
    released = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.AutoAugment(
        T.AutoAugmentPolicy.CIFAR10), T.ToTensor(), T.Normalize(MEAN, STD), Cutout(1, 16)])(img)
    assert torch.equal(ours, released)


def test_dataset_decodes_every_kind_of_file():
    from real_world import encode, odd_images

    kinds = odd_images()
    rows = [{"bytes": encode(img, fmt, opts), "path": None} for img, fmt, opts in kinds.values()]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    ds = datasets.Dataset.from_dict({"image": rows, "label": [i % 2 for i in range(len(rows))]}, features=features)
    train = TransformedImageDataset(ds, build_train_transform("cifar", CIFAR_CFG),
                                    key_transform=moco_key_transform(32, MEAN, STD))
    batch = next(iter(DataLoader(train, batch_size=len(rows))))
    assert batch["pixel_values"].shape == batch["key_values"].shape == (len(rows), 3, 32, 32)
    assert TransformedImageDataset(ds, eval_transform(IMAGENET_CFG))[0]["pixel_values"].shape == (3, 224, 224)
