#!/usr/bin/env python
"""Input pipeline throughput (not part of the test suite): image decode + the CIFAR policy (crop, flip,
AutoAugment, Cutout) + the MoCo key view, built by the trainer's own functions (``build_data`` and
``build_train_loader`` of ``ncl_hub.data`` with ``recipes/configs/cifar10_lt_if100.yaml``: long-tailed
CIFAR-10 from the shared parquet with the validation hold-out, per-sample seeded augmentation, the sampler and
DataLoader), with no training running. Compare its images/s with the training step's
(benchmarks/train_step.py): the target is at least 3x.

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
CONFIG = REPO / "recipes" / "configs" / "cifar10_lt_if100.yaml"


def measure(data_dir: Path, workers: int, batch: int, batches: int, key_view: bool) -> dict:
    from ncl_hub.config import parse_args
    from ncl_hub.data import build_data, build_train_loader
    from ncl_hub.training import build_model

    cfg = parse_args(["--config", str(CONFIG), "--data.dataset", str(data_dir), "--data.num_workers", str(workers),
                      "--data.batch_size", str(batch), "--moco.enabled", str(key_view).lower()])
    data = build_data(cfg)
    loader = build_train_loader(cfg, data, build_model(cfg, data.num_classes), batch)
    times, n = [], 0
    it = iter(loader)
    next(it)  # worker start-up and the first batch
    t_prev = time.perf_counter()
    for _ in it:
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
        n += 1
        if n >= batches:
            break
    per_batch = statistics.median(times)
    return dict(workers=workers, batch=batch, key_view=key_view, train_images=len(data.train),
                images_per_s=round(batch / per_batch, 1), mean_images_per_s=round(batch * len(times) / sum(times), 1),
                cpus=os.cpu_count())


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
