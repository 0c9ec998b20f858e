#!/usr/bin/env python
"""Train NCL on a Hugging Face dataset with Accelerate.

    python recipes/train.py                                   # offline digits demo (configs/digits_demo.yaml)
    accelerate launch recipes/train.py --config recipes/configs/cifar10_lt_if100.yaml
    torchrun --nproc_per_node 2 recipes/train.py --config ... --data.batch_size 128
    python recipes/train.py --help                            # every key, its default and its help

Values merge as defaults <- --config YAML <- --key value. All logic lives in ncl_hub.training.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ncl_hub.cli import run_recipe  # noqa: E402
from ncl_hub.config import parse_args  # noqa: E402
from ncl_hub.training import train  # noqa: E402


DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "digits_demo.yaml"


def _run(args):
    if not args:  # the README's main job: train, evaluate and export the offline digits demo
        args = ["--config", str(DEMO_CONFIG)]
    return train(parse_args(args), argv=args)


def main(argv=None):
    """From the command line an error is one line (--debug: its traceback); in-process callers get exceptions."""
    return run_recipe(_run, argv)


if __name__ == "__main__":
    main()
