#!/usr/bin/env python
"""Input pipeline throughput (not part of the test suite): JPEG decode + the CIFAR policy (crop, flip,
AutoAugment, Cutout) + the MoCo key view, exactly as ``recipes/train.py`` builds it (long-tailed CIFAR-10
from the shared parquet, per-sample seeded augmentation, the DataLoader with the configured workers), with
no training running. Compare its images/s with the training step's (benchmarks/train_step.py): the target
is at least 3x.

    python benchmarks/data.py                                    # default workers (2) and batch 64
    python benchmarks/data.py --workers 0,2,4 --no-key-view
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"


def measure(data_dir: Path, workers: int, batch: int, batches: int, key_view: bool) -> dict:
    import torch
    import timm

    import ncl_hub  # noqa: F401
    from ncl_hub import data as D
    from ncl_hub import transforms as T
    from ncl_hub.config import DataConfig
    from ncl_hub.samplers import build_sampler
    from ncl_hub.training import EpochSeededDataset

    splits = D.load_image_dataset(str(data_dir))
    train = D.prepare_long_tailed(splits["train"], 100.0, seed=0)
    cfg = timm.models.get_pretrained_cfg("ncl_resnet32_cifar10lt.ensemble").to_dict()
    key_tf = T.moco_key_transform(cfg["input_size"], cfg["mean"], cfg["std"]) if key_view else None
    dataset = EpochSeededDataset(T.TransformedImageDataset(train, T.build_train_transform("cifar", cfg),
                                                           key_transform=key_tf), seed=0)
    sampler = build_sampler("instance", train.with_format(None)["label"], seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                         drop_last=True, generator=torch.Generator().manual_seed(0))
    times, n = [], 0
    it = iter(loader)
    next(it)  # worker start-up and the first batch
    t_prev = time.perf_counter()
    for batch_data in it:
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
        n += 1
        if n >= batches:
            break
    per_batch = statistics.median(times)
    return dict(workers=workers, batch=batch, key_view=key_view, images_per_s=round(batch / per_batch, 1),
                mean_images_per_s=round(batch * len(times) / sum(times), 1), cpus=os.cpu_count(),
                default_workers=DataConfig().num_workers)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with CIFAR-10 train/test parquet")
    p.add_argument("--workers", default=None, help="comma list (default: the trainer's default num_workers)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--no-key-view", action="store_true", help="without the MoCo key view")
    args = p.parse_args(argv)
    from ncl_hub.config import DataConfig

    workers = [int(w) for w in args.workers.split(",")] if args.workers else [DataConfig().num_workers]
    rows = []
    for w in workers:
        rows.append(measure(Path(args.data), w, args.batch, args.batches, not args.no_key_view))
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
