#!/usr/bin/env python
"""Evaluate a training output folder or an export folder: overall / many / medium / few accuracy of the
ensemble and of every expert, calibration, expert disagreement, accuracy under shifted test class priors
(forward and backward long tails, with and without logit adjustment); writes metrics.json, summary.md and plots.

    python recipes/evaluate.py outputs/digits_demo                      # its best model, test split
    python recipes/evaluate.py outputs/digits_demo/export/expert --split val --split test
    python recipes/evaluate.py EXPORT --data.dataset ../shared/data/cifar10 --out eval_cifar10
    python recipes/evaluate.py outputs/digits_demo --class-prior train  # deployed where classes follow training

--class-prior train|uniform|FILE: evaluate the model with logits + tau * log(prior), for a deployment whose classes
follow the training frequencies, are uniform, or follow FILE (a JSON list or a text file of C numbers); default: the
prior saved with the model, if any. --prior-strength TAU: tau (default: the model's, else 1).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncl_hub.config import ConfigError  # noqa: E402
from ncl_hub.training import evaluate_run  # noqa: E402


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return None
    path, rest = args[0], args[1:]
    splits, overrides, out, batch, prior, strength = [], {}, None, None, None, None
    i = 0
    while i < len(rest):
        key = rest[i].lstrip("-")
        if i + 1 >= len(rest):
            raise SystemExit(f"error: option {rest[i]} needs a value")
        value = rest[i + 1]
        if key == "split":
            splits.append(value)
        elif key == "out":
            out = value
        elif key == "batch-size":
            batch = int(value)
        elif key == "class-prior":
            prior = value
        elif key == "prior-strength":
            try:
                strength = float(value)
            except ValueError:
                raise SystemExit(f"error: --prior-strength needs a number, got {value!r}") from None
        else:
            overrides[key] = value
        i += 2
    try:
        return evaluate_run(path, splits=splits or None, out_dir=out, overrides=overrides, batch_size=batch,
                            class_prior=prior, prior_strength=strength)
    except ConfigError as e:
        if argv is not None:
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
