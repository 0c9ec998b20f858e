"""Loaders of ``data.pipeline=tensor``: the decoded splits (:mod:`.cache`) kept on the accelerator's device, the
training batches augmented there.

Sampling picks indices, not images: the configured sampler (``ncl_hub.data.samplers``) gives the epoch's order, the
images are gathered from the device tensor, and :func:`.augment.augment_cifar` augments them in chunks of
``data.tensor_chunk`` images, each sample with its own parameters. The parameters of an epoch are drawn on the CPU
from (seed, epoch) and belong to a position in the epoch's order, so a run resumed in the middle of an epoch sees
the images, and the augmentations, an uninterrupted run would have seen; the chunk size changes nothing.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from timm.data import resolve_data_config

from ...config import ConfigError, RunConfig
from ...seeding import derive_seed
from ..build import DataBundle
from ..samplers import build_sampler
from .augment import augment_cifar, draw_cifar_params, normalize
from .cache import decode_split, default_cache_dir, fit_transform

__all__ = ["TENSOR_AUGMENTS", "TensorEvalLoader", "TensorTrainLoader", "build_tensor_loaders", "check_tensor_pipeline"]

TENSOR_AUGMENTS = ("cifar", "none")  # the data.augment policies the tensor pipeline implements


def _augment_generator(seed: int, epoch: int) -> torch.Generator:
    # its own stream of (seed, epoch): unrelated to the sampler's derive_seed(seed, epoch)
    return torch.Generator().manual_seed(derive_seed(seed, epoch, 1))


class TensorTrainLoader:
    """Training micro-batches of ``micro_batch`` images from uint8 images on a device.

    Args:
        images: uint8 [N, 3, H, W] (on the training device).
        labels: int64 [N] (same device).
        sampler: an ``ncl_hub.data.samplers.EpochSampler`` over the N labels.
        micro_batch: images per batch; an epoch is ``len(sampler) // micro_batch`` batches (the rest dropped).
        seed: base seed of the augmentation parameters.
        augment: ``"cifar"`` (:func:`.augment.augment_cifar`) or ``"none"`` (normalisation only).
        mean, std: normalisation.
        chunk: images augmented per call (rounded down to whole batches, at least one).
        channels_last: return batches in channels-last memory format.
        skipped: training rows that could not be decoded (reported by the trainer).

    Yields ``{"pixel_values": float32 [B, 3, H, W], "label": int64 [B], "index": int64 [B]}`` on the device. Set
    ``epoch`` (or ``set_epoch``) before iterating; ``iter_from(k)`` starts at batch k of the epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler, *, micro_batch: int, seed: int,
                 augment: str, mean: Sequence[float], std: Sequence[float], chunk: int = 4096,
                 channels_last: bool = False, skipped: Sequence[int] = ()):
        if augment not in TENSOR_AUGMENTS:
            raise ValueError(f"augment must be one of {TENSOR_AUGMENTS}, got {augment!r}")
        self.images, self.labels, self.sampler = images, labels, sampler
        self.micro_batch, self.seed, self.augment = int(micro_batch), int(seed), augment
        self.mean, self.std = tuple(mean), tuple(std)
        self.chunk_batches = max(1, int(chunk) // self.micro_batch)
        self.channels_last = channels_last
        self.skipped: List[int] = list(skipped)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.sampler) // self.micro_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Dict[str, torch.Tensor]]:
        """The epoch's batches from batch ``start_batch`` on (a resumed run skips the ones it trained on)."""
        self.sampler.set_epoch(self.epoch)
        used = len(self) * self.micro_batch
        order = self.sampler.indices()[:used]
        size = tuple(self.images.shape[-2:])
        params = (draw_cifar_params(used, size, _augment_generator(self.seed, self.epoch))
                  if self.augment == "cifar" else None)
        step = self.chunk_batches * self.micro_batch
        for start in range(start_batch * self.micro_batch, used, step):
            stop = min(used, start + step)
            rows = order[start:stop].to(self.images.device, non_blocking=True)
            x = self._augment(self.images.index_select(0, rows), params[start:stop] if params is not None else None)
            y = self.labels.index_select(0, rows)
            for b in range(0, stop - start, self.micro_batch):
                yield {"pixel_values": x[b:b + self.micro_batch], "label": y[b:b + self.micro_batch],
                       "index": rows[b:b + self.micro_batch]}

    def _augment(self, images: torch.Tensor, params) -> torch.Tensor:
        x = normalize(images, self.mean, self.std) if params is None else augment_cifar(images, params, self.mean,
                                                                                         self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class TensorEvalLoader:
    """Evaluation batches of uint8 images on a device, in order, normalised:
    ``{"pixel_values": float32 [B, 3, H, W], "label": int64 [B]}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], channels_last: bool = False):
        self.images, self.labels, self.batch_size = images, labels, int(batch_size)
        self.mean, self.std, self.channels_last = tuple(mean), tuple(std), channels_last

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        for start in range(0, self.images.shape[0], self.batch_size):
            x = normalize(self.images[start:start + self.batch_size], self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield {"pixel_values": x, "label": self.labels[start:start + self.batch_size]}


def check_tensor_pipeline(cfg: RunConfig, num_processes: int) -> None:
    """What ``data.pipeline=tensor`` does not do, as ConfigErrors naming the alternative."""
    if cfg.data.augment not in TENSOR_AUGMENTS:
        raise ConfigError(f"data.pipeline=tensor implements data.augment {' | '.join(TENSOR_AUGMENTS)}, not "
                          f"{cfg.data.augment!r}; use data.pipeline=pil")
    if cfg.moco.enabled:
        raise ConfigError("data.pipeline=tensor has no MoCo key view; use data.pipeline=pil with moco.enabled, or "
                          "moco.enabled=false")
    if num_processes > 1:
        raise ConfigError(f"data.pipeline=tensor runs in one process (found {num_processes}); use data.pipeline=pil "
                          "for several processes")


def build_tensor_loaders(cfg: RunConfig, data: DataBundle, model, micro_batch: int, device: torch.device,
                         log=print) -> Tuple[TensorTrainLoader, Dict[str, TensorEvalLoader]]:
    """The training loader and the ``val`` / ``test`` loaders of ``data`` on ``device``: each split decoded once
    (or read from the ``data.tensor_cache`` folder), moved to the device, batches made there. ``log`` gets one line
    per split (decoded or read, images, size, seconds)."""
    dc = cfg.data
    pcfg = model.pretrained_cfg
    config = resolve_data_config(pretrained_cfg=dict(pcfg))
    cache_dir = Path(dc.tensor_cache) if dc.tensor_cache else default_cache_dir()
    decoded = {}
    for name, ds in (("train", data.train), ("val", data.val), ("test", data.test)):
        if ds is None:
            continue
        t = time.time()
        split = decode_split(ds, fit_transform("train" if name == "train" else "eval", pcfg), cache_dir, name=name,
                             num_workers=dc.num_workers, on_decode_error="skip")
        decoded[name] = split
        log(f"data: {name} {'decoded' if split.built else 'read'} as uint8 {tuple(split.images.shape)} "
            f"({split.images.numel() / 2**20:.0f} MiB) in {time.time() - t:.1f}s: {split.path}")
    train = decoded["train"]
    sampler = build_sampler(dc.sampler, train.labels, num_classes=data.num_classes, seed=cfg.seed,
                              num_epochs=cfg.epochs)
    common = dict(mean=config["mean"], std=config["std"], channels_last=cfg.channels_last)
    train_loader = TensorTrainLoader(train.images.to(device), train.labels.to(device), sampler,
                                     micro_batch=micro_batch, seed=cfg.seed, augment=dc.augment, chunk=dc.tensor_chunk,
                                     skipped=train.skipped, **common)
    evals = {name: TensorEvalLoader(split.images.to(device), split.labels.to(device), batch_size=dc.eval_batch_size,
                                    **common)
             for name, split in decoded.items() if name != "train"}
    return train_loader, evals

