#!/usr/bin/env python
"""Inference cost of a single NCL expert against the plain timm model it is made of (not part of the tests).

``model.expert(k)`` must cost exactly one trunk plus its head: the same parameter count as
``timm.create_model(backbone, num_classes=C)`` and a latency within 2 %. Both run in eval mode under
``torch.no_grad``, interleaved round by round so that machine drift hits both alike; the ratio is the
median of per-round ratios.

    python benchmarks/inference.py                         # resnet32_cifar, 100 classes, batch 64 and 256
    python benchmarks/inference.py --backbone resnet50 --size 224 --batches 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> list:
    import torch
    import timm

    import ncl_hub

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet32_cifar")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batches", default="64,256")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    single = ncl_hub.create_model(args.backbone, num_classes=args.classes, num_experts=3).expert(1).eval()
    plain = timm.create_model(args.backbone, num_classes=args.classes).eval()
    n_single = single.num_inference_params()
    n_plain = sum(p.numel() for p in plain.parameters())
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(batch, 3, args.size, args.size)
        times = {"expert": [], "plain": []}
        with torch.no_grad():
            for _ in range(5):
                single(x)
                plain(x)
            for _ in range(args.rounds):
                for name, model in (("expert", single), ("plain", plain)):
                    t = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - t)
        ratio = statistics.median(a / b for a, b in zip(times["expert"], times["plain"]))
        row = dict(backbone=args.backbone, batch=batch, params_expert=n_single, params_plain=n_plain,
                   expert_ms=round(statistics.median(times["expert"]) * 1e3, 3),
                   plain_ms=round(statistics.median(times["plain"]) * 1e3, 3), latency_ratio=round(ratio, 4))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
