#!/usr/bin/env python
"""Input pipeline throughput (not part of the test suite), with no training running, built by the trainer's own
functions with ``recipes/configs/cifar10_lt_if100.yaml`` (long-tailed CIFAR-10 from the shared parquet with the
validation hold-out, the sampler, per-sample seeded augmentation):

* ``--pipeline pil``: ``build_train_loader``: image decode + the CIFAR policy (crop, flip, AutoAugment, Cutout) +
  the MoCo key view (unless ``--no-key-view``) in DataLoader workers;
* ``--pipeline tensor``: ``build_tensor_loaders``: the split decoded once to uint8 (or read from the decoded-split
  cache; the time is printed apart), then the same policy on whole chunks of tensors
  (``ncl_hub.data.tensor.augment``) on ``--device``; no key view (the tensor pipeline has none).

images/s is the sustained rate over ``--batches`` batches (mean, not median: the tensor pipeline augments a chunk
of batches at once), after the first for pil (worker start-up), from the first for tensor (its first batch carries
the first chunk's augmentation). Compare with the training step's (benchmarks/train_step.py): the target is at
least 3x.

    python benchmarks/data.py                                    # pil, default workers (2) and batch 64
    python benchmarks/data.py --pipeline pil,tensor --no-key-view --batches 200   # side by side
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
CONFIG = REPO / "recipes" / "configs" / "cifar10_lt_if100.yaml"


def _config(data_dir: Path, pipeline: str, workers: int, batch: int, key_view: bool, cache):
    from ncl_hub.config import parse_args

    args = ["--config", str(CONFIG), "--data.dataset", str(data_dir), "--data.num_workers", str(workers),
            "--data.batch_size", str(batch), "--moco.enabled", str(key_view).lower(), "--data.pipeline", pipeline]
    return parse_args(args + (["--data.tensor_cache", str(cache)] if cache else []))


def _time_batches(loader, batches: int, skip_first: bool):
    times, n = [], 0
    t_prev = t_start = time.perf_counter()
    it = iter(loader)
    if skip_first:  # the DataLoader workers' start-up and the first batch
        next(it)
        t_prev = t_start = time.perf_counter()
    for _ in it:
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
        n += 1
        if n >= batches:
            break
    return times, t_prev - t_start


def measure(data_dir: Path, pipeline: str, workers: int, batch: int, batches: int, key_view: bool, device: str,
            cache) -> dict:
    import torch

    from ncl_hub.data import build_data, build_train_loader
    from ncl_hub.data.tensor.loaders import build_tensor_loaders
    from ncl_hub.training import build_model

    key_view = key_view and pipeline == "pil"
    cfg = _config(data_dir, pipeline, workers, batch, key_view, cache)
    data = build_data(cfg)
    model = build_model(cfg, data.num_classes)
    row = dict(pipeline=pipeline, workers=workers, batch=batch, key_view=key_view, train_images=len(data.train))
    if pipeline == "tensor":
        t = time.perf_counter()
        loader, _ = build_tensor_loaders(cfg, data, model, batch, torch.device(device), log=lambda line: None)
        row.update(device=device, threads=torch.get_num_threads(), prepare_s=round(time.perf_counter() - t, 2))
        loader.set_epoch(0)
    else:
        loader = build_train_loader(cfg, data, model, batch)
    # the tensor pipeline augments a chunk of batches at once: its first batch carries the first chunk's work
    times, total = _time_batches(loader, batches, skip_first=pipeline == "pil")
    row.update(images_per_s=round(batch * len(times) / total, 1), batches=len(times), cpus=os.cpu_count())
    if pipeline == "pil":  # the tensor pipeline's batches are slices of a chunk augmented at once: no median
        row["median_batch_images_per_s"] = round(batch / statistics.median(times), 1)
    return row


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with CIFAR-10 train/test parquet")
    p.add_argument("--pipeline", default="pil", help="comma list of pil, tensor")
    p.add_argument("--workers", default=None, help="comma list (default: the trainer's default num_workers); the "
                   "tensor pipeline uses them for its one-time decode only")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--no-key-view", action="store_true", help="pil without the MoCo key view")
    p.add_argument("--device", default="cpu", help="tensor pipeline: where the images live and are augmented")
    p.add_argument("--tensor-cache", default=None, help="tensor pipeline: decoded-split cache folder "
                   "(default: data.tensor_cache's default)")
    args = p.parse_args(argv)
    from ncl_hub.config import DataConfig

    workers = [int(w) for w in args.workers.split(",")] if args.workers else [DataConfig().num_workers]
    rows = []
    for pipeline in args.pipeline.split(","):
        for w in workers if pipeline == "pil" else workers[:1]:
            rows.append(measure(Path(args.data), pipeline, w, args.batch, args.batches, not args.no_key_view,
                                args.device, args.tensor_cache))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'pipeline':<9} {'workers':>7} {'key view':>8} {'images/s':>9}")
    for r in rows:
        print(f"{r['pipeline']:<9} {r['workers']:>7} {str(r['key_view']):>8} {r['images_per_s']:>9.1f}")
    return rows


if __name__ == "__main__":
    main()
