#!/usr/bin/env python
"""Evaluate a training output folder or an export folder: overall / many / medium / few accuracy of the
ensemble and of every expert, calibration, expert disagreement, accuracy under shifted test class priors
(forward and backward long tails, with and without logit adjustment); writes metrics.json, summary.md and plots.

    python recipes/evaluate.py outputs/digits_demo                      # its best model, test split
    python recipes/evaluate.py outputs/digits_demo/export/expert --split val --split test
    python recipes/evaluate.py EXPORT --data.dataset ../shared/data/cifar10 --out eval_cifar10
    python recipes/evaluate.py outputs/digits_demo --class-prior train  # deployed where classes follow training

Any training key (--data.dataset, --data.limit_eval, ...) overrides the run's saved configuration.
All logic lives in ncl_hub.apps.evaluate.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ncl_hub.apps import EvaluateOptions, evaluate_run  # noqa: E402
from ncl_hub.config import ConfigError, RunConfig, parse_options  # noqa: E402


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if not args:
            args = ["--help"]
        opts, overrides = parse_options(EvaluateOptions, args, positional=["path"], description=__doc__,
                                        overrides_of=RunConfig)
        return evaluate_run(opts.path, splits=opts.split, out_dir=opts.out, overrides=overrides,
                            batch_size=opts.batch_size, class_prior=opts.class_prior,
                            prior_strength=opts.prior_strength)
    except ConfigError as e:
        if argv is not None:  # in-process callers (tests) get the exception
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
