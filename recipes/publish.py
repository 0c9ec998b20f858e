#!/usr/bin/env python
"""Publish a training run to the Hugging Face Hub: the ensemble and the expert selected on the validation split.

    python recipes/publish.py OUTPUT_DIR --repo-id ORG/NAME [--private] [--dry-run] [--format ncl|timm]

Creates ORG/NAME (the ensemble) and ORG/NAME-expert (the single expert), staging both under OUTPUT_DIR/publish/.
With --dry-run nothing leaves the machine. The token comes from HF_TOKEN or `hf auth login`; there is deliberately
no --token flag, so it never lands in shell history or process listings. All logic is in ncl_hub.hub.publish.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ncl_hub.cli import DEBUG_HELP, run_recipe  # noqa: E402
from ncl_hub.config import parse_options  # noqa: E402
from ncl_hub.hub import PublishOptions, publish  # noqa: E402


def _run(args):
    opts, _ = parse_options(PublishOptions, args, positional=["output_dir"], description=f"{__doc__}\n{DEBUG_HELP}")
    result = publish(opts.output_dir, opts.repo_id, private=opts.private, dry_run=opts.dry_run, format=opts.format,
                     commit_message=opts.commit_message)
    print(json.dumps(result, indent=2))
    return result


def main(argv=None):
    """From the command line an error is one line (--debug: its traceback); in-process callers get exceptions."""
    return run_recipe(_run, argv)


if __name__ == "__main__":
    main()
