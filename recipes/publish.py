"""Publish a training run to the Hugging Face Hub: the ensemble and the expert selected on the validation split.

    python recipes/publish.py OUTPUT_DIR --repo-id ORG/NAME [--private] [--dry-run] [--format ncl|timm]

Creates ORG/NAME (the ensemble) and ORG/NAME-expert (the single expert), staging both under OUTPUT_DIR/publish/.
With --dry-run nothing leaves the machine. The token comes from HF_TOKEN or `hf auth login`; there is deliberately
no --token flag, so it never lands in shell history or process listings. All logic is in ncl_hub.hub.publish.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional, Sequence

from ncl_hub.hub import FORMATS, publish


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="training output folder (best/, eval/, run_info.json, export/)")
    parser.add_argument("--repo-id", required=True, help="Hub repo of the ensemble, ORG/NAME; the expert goes to "
                                                         "ORG/NAME-expert")
    parser.add_argument("--private", action="store_true", help="create private repos")
    parser.add_argument("--dry-run", action="store_true", help="only stage the folders under OUTPUT_DIR/publish/")
    parser.add_argument("--format", choices=FORMATS, default="ncl",
                        help="format of the expert repo: ncl (needs `import ncl_hub`) or plain timm")
    parser.add_argument("--commit-message", default=None, help="commit message of both uploads")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    result = publish(args.output_dir, args.repo_id, private=args.private, dry_run=args.dry_run, format=args.format,
                     commit_message=args.commit_message)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
