"""What the end-of-training calibration costs: ``fit_model_calibration`` (method and prior-estimation shrinkage chosen
per model, the ensemble and each expert) on synthetic logits of a few split sizes.

    python benchmarks/calibration_cost.py            # 3 experts; 180 x 10, 500 x 10 and 1,000 x 100
    python benchmarks/calibration_cost.py --sizes 5000x1000 --experts 3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ncl_hub.calibration import fit_model_calibration  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="180x10,500x10,1000x100", help="comma-separated NxC validation splits")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.experts} experts")
    print("| split (N x C) | seconds | methods (ensemble; experts) | shrinkage |")
    print("|---|---:|---|---:|")
    for size in args.sizes.split(","):
        n, c = (int(v) for v in size.lower().split("x"))
        generator = torch.Generator().manual_seed(0)
        y = torch.arange(n) % c
        z = torch.randn(args.experts, n, c, generator=generator) + 3 * torch.nn.functional.one_hot(y, c)
        start = time.perf_counter()
        out = fit_model_calibration(z, y, class_counts=list(range(c, 0, -1)))
        seconds = time.perf_counter() - start
        methods = f"{out['methods']['ensemble']}; {', '.join(out['methods']['experts'])}"
        print(f"| {n} x {c} | {seconds:.1f} | {methods} | {out['prior_shrinkage']:g} |")


if __name__ == "__main__":
    main()
