#!/usr/bin/env python
"""Evaluate a training output folder or an export folder: overall / many / medium / few accuracy of the
ensemble and of every expert, calibration, expert disagreement, accuracy under shifted test class priors
(forward and backward long tails, with and without logit adjustment); writes metrics.json, summary.md and plots.

    python recipes/evaluate.py outputs/digits_demo                      # its best model, test split
    python recipes/evaluate.py outputs/digits_demo/export/expert --split val --split test
    python recipes/evaluate.py EXPORT --data.dataset ../shared/data/cifar10 --out eval_cifar10
    python recipes/evaluate.py outputs/digits_demo --class-prior train  # deployed where classes follow training
    python recipes/evaluate.py RUN --split val --split test --calibrate-on val  # (re)fit the calibration first

Any training key (--data.dataset, --data.limit_eval, ...) overrides the run's saved configuration.
All logic lives in ncl_hub.apps.evaluate.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ncl_hub.apps import EvaluateOptions, evaluate_run  # noqa: E402
from ncl_hub.cli import DEBUG_HELP, run_recipe  # noqa: E402
from ncl_hub.config import RunConfig, parse_options  # noqa: E402


def _run(args):
    opts, overrides = parse_options(EvaluateOptions, args or ["--help"], positional=["path"],
                                    description=f"{__doc__}\n{DEBUG_HELP}", overrides_of=RunConfig)
    return evaluate_run(opts.path, splits=opts.split, out_dir=opts.out, overrides=overrides,
                        batch_size=opts.batch_size, class_prior=opts.class_prior, prior_strength=opts.prior_strength,
                        calibrate_on=opts.calibrate_on)


def main(argv=None):
    """From the command line an error is one line (--debug: its traceback); in-process callers get exceptions."""
    return run_recipe(_run, argv)


if __name__ == "__main__":
    main()
