"""How much of the estimated prior's error near the balanced mix comes from the calibration split: for finished
training runs, the prior of half of the balanced test split is estimated by EM, and that half is scored, with the
calibration fitted as deployed (on the run's validation split) and, for the diagnosis only, with BCTS fitted on the
other half of the test split (its labels used: a large calibration split from the test distribution).

    python benchmarks/calibration_split.py outputs/studies/schedule_cifar10_lt/ncl_nohard_e60/seed_0 [RUN ...]

Prints, per run and model (the ensemble, and the expert selected on validation): the accuracy of the scored half
raw and with the estimated prior, and the L1 error of the estimate (sum over classes of |estimated - true|).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from accelerate import Accelerator  # noqa: E402

from ncl_hub import hub  # noqa: E402
from ncl_hub.calibration import Calibration, fit_bcts, fit_model_calibration  # noqa: E402
from ncl_hub.config import load_config  # noqa: E402
from ncl_hub.data import build_data, build_eval_loader  # noqa: E402
from ncl_hub.evaluate import predict  # noqa: E402
from ncl_hub.priors import estimate_prior  # noqa: E402


def run_logits(run: Path):
    """Raw expert logits [K, N, C] and labels of the run's validation and test splits, and its run_info."""
    cfg = load_config(run / "config.yaml")
    model = hub.load_model(str(run / "best"))
    model.set_class_prior(None)
    data = build_data(cfg, check=["val", "test"])
    accelerator = Accelerator()
    model.to(accelerator.device)
    out = {}
    for name, split in (("val", data.val), ("test", data.test)):
        loader = build_eval_loader(cfg, split, model.pretrained_cfg, 0, split=name)
        out[name] = predict(model, accelerator.prepare(loader), accelerator)
    return out, json.loads((run / "run_info.json").read_text())


def scored(z: torch.Tensor, y: torch.Tensor, calibration: Calibration, shrinkage: float):
    """(top-1 with the prior estimated on these logits, L1 error of the estimate)."""
    zc = calibration.apply(z)
    prior = estimate_prior(zc, shrinkage=shrinkage).prior
    true = torch.bincount(y, minlength=z.shape[1]).double() / y.numel()
    top1 = ((zc + prior.log()).argmax(1) == y).double().mean().item() * 100
    return top1, (prior - true).abs().sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training output folders (config.yaml, best/)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| run | model | calibration fitted on | raw top-1 | estimated top-1 | estimated - raw | L1 error |")
    print("|---|---|---|---:|---:|---:|---:|")
    for run in args.runs:
        logits, info = run_logits(run)
        calibration = fit_model_calibration(*logits["val"], split="val", class_counts=info.get("class_counts"))
        zt, yt = logits["test"]
        yt = yt.long()
        scored_half = torch.arange(yt.numel()) % 2 == 1
        z_val_models = [("ensemble", zt.double().mean(0), calibration["ensemble"])] if zt.shape[0] > 1 else []
        sel = int(info.get("selected_expert") or 0)
        z_val_models.append((f"expert {sel}", zt[sel].double(), calibration["experts"][sel]))
        for model, z, fitted in z_val_models:
            zs, ys = z[scored_half], yt[scored_half]
            raw = (zs.argmax(1) == ys).double().mean().item() * 100
            rows = [(f"val ({calibration['num_samples']} images)", Calibration.from_dict(fitted),
                     fitted["prior_shrinkage"]),
                    (f"other test half ({int((~scored_half).sum())} images)",
                     fit_bcts(z[~scored_half], yt[~scored_half]), 0.0)]
            for where, cal, shrinkage in rows:
                top1, l1 = scored(zs, ys, cal, shrinkage)
                print(f"| {run} | {model} | {where} | {raw:.2f} | {top1:.2f} | {top1 - raw:+.2f} | {l1:.3f} |")


if __name__ == "__main__":
    main()
