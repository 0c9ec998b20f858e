"""data.pipeline=tensor: the batched augmentation against the PIL path, its random policy, the decoded-split cache,
the device loaders (resume, chunks), the recipe end to end and a dry run of the GPU script.

Tolerance: none. The PIL path runs Pillow on 8-bit images; ``data.tensor.augment`` reproduces Pillow's arithmetic
(16.16 fixed-point nearest-neighbour coordinates, float32 blends truncated to uint8, its lookup tables), so every
operation is compared for exact equality of the uint8 images, and the whole policy for equality of the float
outputs up to float32 rounding (1e-6).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

from ncl_hub.data.tensor import augment as A
from ncl_hub.data.transforms import Cutout

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _images(n: int = 12, seed: int = 0):
    """Noise, smooth gradients with noise, a flat image and a low-contrast one: PIL images and uint8 [n, 3, 32, 32]."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n // 2)]
    ramp = np.linspace(0, 1, 32)
    for i in range(n // 2 - 2):
        base = 40 + 150 * np.stack([np.add.outer(ramp, ramp * (c + i) / 4) / 2 for c in range(3)], -1)
        arrays.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    arrays.append(np.full((32, 32, 3), 77, np.uint8))
    arrays.append(rng.integers(120, 124, (32, 32, 3), dtype=np.uint8))
    pil = [Image.fromarray(a) for a in arrays]
    return pil, torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays])


def _tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _magnitudes(op: str):
    """Every magnitude AutoAugment CIFAR10 can pass to ``op`` (each bin, both signs where signed)."""
    space = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)._augmentation_space(10, (32, 32))
    values, signed = space[op]
    values = [float(v) for v in values.flatten()] if values.ndim else [0.0]
    return [v * s for v in values for s in ((1, -1) if signed else (1,))]


@pytest.mark.parametrize("op", list(A.AUTOAUGMENT_OPS))
def test_each_autoaugment_op_equals_pil_at_every_magnitude(op):
    pil, x = _images()
    for magnitude in _magnitudes(op):
        expected = torch.stack([_tensor(_apply_op(img, op, magnitude, InterpolationMode.NEAREST, None)) for img in pil])
        got = A.AUTOAUGMENT_OPS[op](x.clone(), torch.full((len(pil),), magnitude, dtype=torch.float64))
        assert got.dtype == torch.uint8
        assert torch.equal(got, expected), (op, magnitude, (got.int() - expected.int()).abs().max().item())


def test_per_sample_magnitudes_in_one_batch():
    pil, x = _images(8)
    mags = torch.tensor([-30.0, -10.0, -3.0, 0.0, 2.5, 6.7, 15.0, 30.0], dtype=torch.float64)
    got = A.rotate(x, mags)
    for i, img in enumerate(pil):
        assert torch.equal(got[i], _tensor(_apply_op(img, "Rotate", float(mags[i]), InterpolationMode.NEAREST, None)))


def test_crop_flip_cutout_normalize_equal_torchvision():
    pil, x = _images(6)
    top, left = torch.tensor([0, 8, 3, 4, 7, 1]), torch.tensor([8, 0, 5, 4, 2, 6])
    got = A.crop_with_padding(x, top, left, padding=4)
    for i, img in enumerate(pil):
        assert torch.equal(got[i], _tensor(F.crop(F.pad(img, 4), int(top[i]), int(left[i]), 32, 32)))
    flip = torch.tensor([True, False, True, True, False, False])
    flipped = A.hflip(x, flip)
    for i, img in enumerate(pil):
        assert torch.equal(flipped[i], _tensor(F.hflip(img)) if flip[i] else x[i])
    normalised = A.normalize(x, MEAN, STD)
    reference = torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(img)) for img in pil])
    assert torch.equal(normalised, reference)
    # Cutout at the centres the PIL path's Cutout draws from the torch RNG (cy, then cx), corners included
    for seed in range(20):
        torch.manual_seed(seed)
        expected = Cutout(1, 16)(reference[0])
        torch.manual_seed(seed)
        cy, cx = int(torch.randint(32, ())), int(torch.randint(32, ()))
        got = A.cutout(reference[:1], torch.tensor([cy]), torch.tensor([cx]), 16)[0]
        assert torch.equal(got, expected), (cy, cx)


def _pil_pipeline(img, p, i):
    """The PIL path's steps after its resize (cifar_train_transform) with sample i's parameters."""
    img = F.crop(F.pad(img, 4), int(p.top[i]), int(p.left[i]), 32, 32)
    if p.flip[i]:
        img = F.hflip(img)
    names = list(A.AUTOAUGMENT_OPS)
    for slot in range(2):
        if p.op[i, slot] >= 0:
            img = _apply_op(img, names[p.op[i, slot]], float(p.magnitude[i, slot]), InterpolationMode.NEAREST, None)
    x = T.Normalize(MEAN, STD)(T.ToTensor()(img))
    return A.cutout(x[None], p.cutout_y[i:i + 1], p.cutout_x[i:i + 1])[0]


def test_augment_cifar_equals_the_pil_pipeline_sample_by_sample():
    pil, x = _images(12, seed=3)
    pil, x = pil * 4, x.repeat(4, 1, 1, 1)
    params = A.draw_cifar_params(len(pil), (32, 32), torch.Generator().manual_seed(5))
    assert (params.op >= 0).any(1).float().mean() > 0.5  # most samples get at least one AutoAugment operation
    got = A.augment_cifar(x, params, MEAN, STD)
    for i, img in enumerate(pil):
        assert torch.allclose(got[i], _pil_pipeline(img, params, i), atol=1e-6, rtol=0), i


def test_policy_frequencies_match_its_probabilities():
    n = 100_000
    p = A.draw_cifar_params(n, (32, 32), torch.Generator().manual_seed(0))
    policy = A.autoaugment_policy((32, 32))
    num_ops = len(A.AUTOAUGMENT_OPS)
    for slot in range(2):
        # P(op k in this slot) = sum over sub-policies s with op[s, slot] = k of p[s, slot] / 25
        expected = torch.zeros(num_ops, dtype=torch.float64)
        expected.index_add_(0, policy["op"][:, slot], policy["prob"][:, slot] / len(policy["op"]))
        ops = p.op[:, slot]
        observed = torch.bincount(ops[ops >= 0], minlength=num_ops).double() / n
        sigma = (expected * (1 - expected) / n).sqrt()
        assert ((observed - expected).abs() <= 5 * sigma + 1e-3).all(), (slot, observed, expected)
        # a signed operation is negated half the time
        signed = torch.isin(ops, policy["op"][policy["signed"]]) & (p.magnitude[:, slot] != 0)
        assert abs((p.magnitude[:, slot] < 0)[signed].double().mean().item() - 0.5) < 0.01
    assert abs(p.flip.double().mean().item() - 0.5) < 0.01
    for offsets in (p.top, p.left):
        assert torch.equal(torch.unique(offsets), torch.arange(9))
        assert (torch.bincount(offsets).double() / n - 1 / 9).abs().max() < 0.01
    assert torch.equal(torch.unique(p.cutout_y), torch.arange(32)) and torch.equal(torch.unique(p.cutout_x),
                                                                                    torch.arange(32))
    again = A.draw_cifar_params(n, (32, 32), torch.Generator().manual_seed(0))
    assert torch.equal(again.op, p.op) and torch.equal(again.magnitude, p.magnitude)


# ---------------------------------------------------------------------------------------------- cache and loaders
def test_decoded_cache_is_reused_and_rebuilt_when_data_or_selection_change(tmp_path):
    import timm

    from conftest import make_tiny_dataset
    from ncl_hub.data import load_image_dataset
    from ncl_hub.data.tensor.cache import decode_split, fit_transform
    from ncl_hub.data.transforms import TransformedImageDataset

    cfg = timm.models.get_pretrained_cfg("resnet32_cifar").to_dict()
    train = load_image_dataset(str(make_tiny_dataset(tmp_path / "a")))["train"]
    fit, cache = fit_transform("train", cfg), tmp_path / "cache"
    first = decode_split(train, fit, cache, name="train")
    assert first.built and first.images.shape == (len(train), 3, 32, 32) and first.images.dtype == torch.uint8
    reference = TransformedImageDataset(train, T.Compose([fit, T.PILToTensor()]))
    assert torch.equal(first.images[5], reference[5]["pixel_values"])
    assert first.labels.tolist() == train.with_format(None)["label"]
    again = decode_split(train, fit, cache, name="train")
    assert not again.built and again.path == first.path and torch.equal(again.images, first.images)
    subset = decode_split(train.select(range(10)), fit, cache, name="train")  # another selection
    assert subset.built and subset.path != first.path and torch.equal(subset.images, first.images[:10])
    other = load_image_dataset(str(make_tiny_dataset(tmp_path / "b", seed=1)))["train"]  # other images
    changed = decode_split(other, fit, cache, name="train")
    assert changed.built and changed.path not in (first.path, subset.path)
    bigger = decode_split(train, fit_transform("train", dict(cfg, input_size=(3, 40, 40))), cache, name="train")
    assert bigger.built and bigger.images.shape[-1] == 40
    first.path.write_bytes(b"damaged")  # a damaged file is decoded again and replaced
    repaired = decode_split(train, fit, cache, name="train")
    assert repaired.built and torch.equal(repaired.images, first.images)
    assert not decode_split(train, fit, cache, name="train").built


def test_loader_is_reproducible_resumable_and_independent_of_the_chunk():
    from ncl_hub.data.tensor.loaders import TensorTrainLoader
    from ncl_hub.data.samplers import build_sampler

    _, x = _images(12)
    images, labels = x.repeat(5, 1, 1, 1), torch.arange(60) % 4
    make = lambda chunk: TensorTrainLoader(  # noqa: E731
        images, labels, build_sampler("class", labels, seed=3), micro_batch=8, seed=3, augment="cifar", mean=MEAN,
        std=STD, chunk=chunk)
    loader = make(16)
    assert len(loader) == 7
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == 7 and full[0]["pixel_values"].shape == (8, 3, 32, 32)
    for chunk in (8, 4096):
        other = make(chunk)
        other.set_epoch(2)
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(full, other))
    resumed = make(24)
    resumed.set_epoch(2)
    tail = list(resumed.iter_from(3))
    assert len(tail) == 4
    for a, b in zip(full[3:], tail):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))["pixel_values"], full[0]["pixel_values"])
    # class-balanced sampling repeats images within an epoch; each repeat has its own augmentation
    batch = torch.cat([b["pixel_values"] for b in full])
    index = torch.cat([b["index"] for b in full])
    i, j = next((i, j) for i in range(len(index)) for j in range(i) if index[i] == index[j])
    assert not torch.equal(batch[i], batch[j])


def test_tensor_pipeline_recipe_trains_evaluates_and_resumes_exactly(tiny_data, tmp_path):
    import shutil

    import train as train_recipe
    from conftest import TINY
    from safetensors.torch import load_file

    base = [*TINY, "--data.dataset", str(tiny_data), "--data.pipeline", "tensor", "--data.tensor_cache",
            str(tmp_path / "cache"), "--epochs", "1", "--save_every_steps", "1", "--keep_last", "20",
            "--deterministic", "--data.tensor_chunk", "8", "--channels_last"]
    full = tmp_path / "full"
    result = train_recipe.main([*base, "--output_dir", str(full)])
    assert [h["step"] for h in result["history"]] == [2]
    assert result["metrics"]["splits"]["test"]["num_samples"] == 12
    assert (full / "export" / "ensemble" / "model.safetensors").is_file()
    assert (full / "checkpoints" / "epoch_0000_step_0000001").is_dir()  # after step 1: where the resumed run starts
    part = tmp_path / "resumed"
    shutil.copytree(full, part, ignore=shutil.ignore_patterns("export", "eval", "run_info.json"))
    shutil.rmtree(part / "checkpoints" / "epoch_0000")
    train_recipe.main([*base, "--output_dir", str(part), "--resume"])
    a, b = (load_file(p / "checkpoints" / "epoch_0000" / "model.safetensors") for p in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensor_pipeline_refuses_what_it_does_not_do(tiny_data, tmp_path):
    import train as train_recipe
    from conftest import TINY
    from ncl_hub.config import ConfigError

    common = [*TINY, "--data.dataset", str(tiny_data), "--data.pipeline", "tensor", "--epochs", "1"]
    with pytest.raises(ConfigError, match="augment"):
        train_recipe.main([*common, "--data.augment", "randaugment", "--output_dir", str(tmp_path / "a")])
    with pytest.raises(ConfigError, match="MoCo"):
        train_recipe.main([*common, "--moco.enabled", "true", "--output_dir", str(tmp_path / "b")])


# ---------------------------------------------------------------------------------------------- the GPU script
def test_gpu_script_dry_run_on_cpu(cifar10_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", DEVICE="cpu", EPOCHS="1", LIMIT="512", SMOKE_STEPS="1",
               BENCH_MODES="none", PYTHON=sys.executable, DATA=str(cifar10_dir), WORK=str(tmp_path / "work"),
               EXTRA="--model.name null --model.backbone resnet8_cifar_tiny --data.eval_batch_size 128")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_reproduce.sh"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "datasets " in log and "== smoke run exit 0" in log and "== full run exit 0" in log
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_done"] == 1 and summary["exit_code"] == 0
    assert set(summary["test_top1"]) >= {"single", "ensemble"} and summary["epoch_images_per_s_first"] > 0
    assert (tmp_path / "out" / "metrics.json").is_file()
