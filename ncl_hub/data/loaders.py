"""DataLoaders of a run: decoding and augmentation in the loader workers, per-sample seeds that follow the epoch,
the configured sampler. ``recipes/train.py`` (through ``ncl_hub.training``), ``evaluate_run`` and
``benchmarks/data.py`` use them."""
from __future__ import annotations

import random
from typing import Any, Dict, Mapping

import torch

from ..config import RunConfig
from ..seeding import seed_words
from .build import DataBundle
from .samplers import build_sampler
from .transforms import (
    TransformedImageDataset, build_train_transform, decode_min_side, eval_transform, moco_key_transform,
)

__all__ = ["EpochSeededDataset", "build_eval_loader", "build_train_loader"]


class EpochSeededDataset(torch.utils.data.Dataset):
    """Seeds the augmentation of sample i in epoch e from (seed, e, i): the pipeline is then the same
    whatever the number of workers, and a resumed run sees exactly the images an uninterrupted one saw.
    The caller's RNG state is restored after each sample (it may run in the main process)."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> list:
        """Indices whose image could not be decoded (``TransformedImageDataset.skipped``)."""
        return self.dataset.skipped

    def __getitem__(self, index: int):
        torch_seed, python_seed = seed_words(self.seed, self.epoch, int(index))
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            random.seed(python_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


def _loader_kwargs(cfg: RunConfig) -> Dict[str, Any]:
    return dict(num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=False)


def build_train_loader(cfg: RunConfig, data: DataBundle, model, micro_batch: int) -> torch.utils.data.DataLoader:
    """The training DataLoader (before ``accelerator.prepare``) of ``micro_batch`` images per process: the
    ``cfg.data.augment`` policy for ``model.pretrained_cfg`` and, with MoCo, the key view; per-sample seeds that
    follow the epoch (``loader.dataset.epoch``); the configured sampler (``loader.sampler.set_epoch``)."""
    pcfg = model.pretrained_cfg
    train_tf = build_train_transform(cfg.data.augment, pcfg)
    key_tf = moco_key_transform(pcfg["input_size"], pcfg["mean"], pcfg["std"]) if model.moco is not None else None
    # every image was checked before training: one that turns unreadable since is skipped and named, never fatal
    images = TransformedImageDataset(data.train, train_tf, key_transform=key_tf, on_decode_error="skip",
                                     min_side=decode_min_side(pcfg), split="train")
    train_set = EpochSeededDataset(images, seed=cfg.seed)
    labels = data.train.with_format(None)["label"]
    sampler = build_sampler(cfg.data.sampler, labels, num_classes=data.num_classes, seed=cfg.seed,
                            num_epochs=cfg.epochs)
    return torch.utils.data.DataLoader(
        train_set, batch_size=micro_batch, sampler=sampler, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed), **_loader_kwargs(cfg))


def build_eval_loader(cfg: RunConfig, dataset, pretrained_cfg: Mapping[str, Any], batch_size: int = 0,
                      split: str = "eval") -> torch.utils.data.DataLoader:
    """An evaluation DataLoader in dataset order: the model's eval transform, ``batch_size`` images per batch
    (0: ``cfg.data.eval_batch_size``); an image that turned unreadable after the check is skipped and named."""
    images = TransformedImageDataset(dataset, eval_transform(pretrained_cfg), on_decode_error="skip",
                                     min_side=decode_min_side(pretrained_cfg), split=split)
    return torch.utils.data.DataLoader(images, batch_size=batch_size or cfg.data.eval_batch_size, shuffle=False,
                                       **_loader_kwargs(cfg))
