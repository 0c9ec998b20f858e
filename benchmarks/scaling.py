#!/usr/bin/env python
"""How NCL's cost grows: images/s and peak memory as the number of experts K goes 1..5 and as the batch
doubles (not part of the test suite). Each point runs in its own subprocess through
``benchmarks/train_step.py``'s measurement (the StepRunner path of recipes/train.py, interleaved with the
compute floor).

    python benchmarks/scaling.py                          # eager, CPU, resnet32_cifar, CIFAR-100 setting
    python benchmarks/scaling.py --mode compiled --moco   # compiled step with the MoCo branch
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_step import CIFAR_MOCO  # noqa: E402


def point(backbone: str, K: int, batch: int, moco: bool, mode: str, device: str, steps: int, threads: int) -> dict:
    setting = dict(name=f"{backbone}/K{K}/b{batch}/{'moco' if moco else 'nomoco'}", backbone=backbone,
                   num_experts=K, num_classes=100, size=32, batch=batch, moco=CIFAR_MOCO if moco else None,
                   classifier="linear")
    cmd = [sys.executable, str(HERE / "train_step.py"), "--device", device, "--steps", str(steps), "--warmup", "3",
           "--threads", str(threads), "--child", json.dumps([setting, mode])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{setting['name']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[7:])


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet32_cifar")
    p.add_argument("--mode", default="eager", choices=["eager", "compiled", "bf16"])
    p.add_argument("--moco", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", default="1,2,3,4,5")
    p.add_argument("--batches", default="32,64,128,256")
    args = p.parse_args(argv)
    rows = []
    for K in [int(k) for k in args.experts.split(",")]:
        rows.append(point(args.backbone, K, 64, args.moco, args.mode, args.device, args.steps, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        if batch == 64 and any(r["setting"].endswith(f"/K3/b64/{'moco' if args.moco else 'nomoco'}") for r in rows):
            continue
        rows.append(point(args.backbone, 3, batch, args.moco, args.mode, args.device, args.steps, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'setting':<34} {'img/s':>8} {'step ms':>9} {'step/floor':>10} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['setting']:<34} {r['images_per_s']:>8.1f} {r['step_ms']:>9.1f} {r['step_over_floor']:>10.3f} "
              f"{r['peak_memory_mib']:>9.1f}")
    return rows


if __name__ == "__main__":
    main()
