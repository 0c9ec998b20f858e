"""How much of the estimated prior's error near the balanced mix comes from the calibration split: for finished
training runs, the calibration (method and prior-estimation shrinkage, ``fit_model_calibration``) is fitted as
deployed, on the run's validation split, and, for the diagnosis only, on the even-indexed half of the test split
(its labels used: a larger calibration split drawn from the test distribution). Each is then scored as the
deployment study scores r = 1 (``estimated_prior_shift``), on the odd-indexed test half: balanced subsets drawn,
the prior estimated by EM on one half of each, the other half scored with the estimate.

    python benchmarks/calibration_split.py outputs/studies/schedule_cifar10_lt/ncl_nohard_e60/seed_0 [RUN ...]

Prints, per run and model (the ensemble, and the expert selected on validation): the accuracy raw and with the
estimated prior (means over the draws), and the L1 error of the estimate (sum over classes of |estimated - true|).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from accelerate import Accelerator  # noqa: E402

from ncl_hub.apps.evaluate import open_run, predict_splits  # noqa: E402
from ncl_hub.calibration import fit_model_calibration  # noqa: E402
from ncl_hub.evaluate.shift import calibration_maps, estimated_prior_shift  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training output folders (config.yaml, best/)")
    parser.add_argument("--draws", type=int, default=5, help="balanced subsets drawn from the scored half")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator()
    print("| run | model | calibration fitted on | raw top-1 | estimated top-1 | estimated - raw | L1 error |")
    print("|---|---|---|---:|---:|---:|---:|")
    for path in args.runs:
        run = open_run(path, ["val", "test"])
        predictions = predict_splits(run, ["val", "test"], accelerator)
        z, y = predictions["test"]
        y = y.long().cpu()
        odd = torch.arange(y.numel()) % 2 == 1
        fits = [("val", predictions["val"]), ("even test half", (z[:, ~odd], y[~odd]))]
        num_experts = z.shape[0]
        names = (["ensemble"] if num_experts > 1 else []) + [f"expert {run.selected_expert or 0}"]
        for where, (z_fit, y_fit) in fits:
            calibration = fit_model_calibration(z_fit, y_fit, split=where, class_counts=run.class_counts)
            records = estimated_prior_shift(
                z[:, odd], y[odd], counts=torch.tensor(run.class_counts, dtype=torch.float64), deployed=None,
                strength=1.0, imbalances=[1.0], maps=calibration_maps(calibration, num_experts),
                draws=args.draws, seed=args.seed, shrinkage=0.0)
            for rec in (r for r in records if r["model"] in names):
                print(f"| {path} | {rec['model']} | {where} ({calibration['num_samples']} images) "
                      f"| {rec['raw_top1']:.2f} | {rec['top1']:.2f} | {rec['top1'] - rec['raw_top1']:+.2f} "
                      f"| {rec['prior_l1']:.3f} |")


if __name__ == "__main__":
    main()
