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

from ncl_hub.config import ConfigError, parse_args  # noqa: E402
from ncl_hub.training import train  # noqa: E402


DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "digits_demo.yaml"


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # the README's main job: train, evaluate and export the offline digits demo
        args = ["--config", str(DEMO_CONFIG)]
    try:
        cfg = parse_args(args)
        return train(cfg, argv=args)
    except ConfigError as e:
        if argv is not None:  # in-process callers (tests) get the exception
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
