#!/usr/bin/env python
"""Predict the classes of images with a trained model: one CSV row per image (its path, the top-k classes and their
probabilities); images that cannot be read are listed at the end and skipped.

    python recipes/predict.py outputs/digits_demo photos/ --output predictions.csv
    python recipes/predict.py EXPORT 'shots/*.jpg' more.jpg --top-k 3
    python recipes/predict.py hf-hub:ORG/NAME images.parquet --class-prior train
    python recipes/predict.py EXPORT camera_trap/ --class-prior estimate       # prior estimated from these images
    python recipes/predict.py EXPORT new_batch/ --class-prior predictions.prior.json

MODEL: a training output folder, an export folder or hf-hub:ORG/NAME. INPUT: image folders (searched recursively),
image files or globs, parquet files, or datasets folders. With --class-prior estimate the class prior of the images
is estimated from the model's calibrated probabilities (EM), printed beside the training prior and written as JSON
that --class-prior FILE.json and timm.create_model(..., class_prior=FILE.json) accept.
All logic lives in ncl_hub.apps.predict.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ncl_hub.apps import PredictOptions, predict_images  # noqa: E402
from ncl_hub.cli import DEBUG_HELP, run_recipe  # noqa: E402
from ncl_hub.config import parse_options  # noqa: E402


def _run(args):
    opts, _ = parse_options(PredictOptions, args or ["--help"], positional=["model", "input"],
                            description=f"{__doc__}\n{DEBUG_HELP}")
    return predict_images(opts)


def main(argv=None):
    """From the command line an error is one line (--debug: its traceback); in-process callers get exceptions."""
    return run_recipe(_run, argv)


if __name__ == "__main__":
    main()
