#!/usr/bin/env python
"""Run a seeded study (training configurations x seeds) and regenerate docs/results.md from its run folders.

    python recipes/study.py --config recipes/studies/cifar10_lt_cpu.yaml --jobs 2   # run (skip done, resume killed)
    python recipes/study.py --config recipes/studies/cifar10_lt_cpu.yaml --report   # collect finished runs only
    python recipes/study.py --report                                                 # docs/results.md from the JSON
    python recipes/study.py --config ... --dry-run                                   # the train.py commands
    python recipes/study.py --config recipes/studies/deployment_cifar10_lt.yaml     # evaluate another study's runs

Each run is recipes/train.py in its own process, log in <run>/train.log. A `kind: deployment` study trains
nothing: it runs recipes/evaluate.py on the finished runs of the study it names (log in <run>/<out>.log; runs still
training wait). The record of a study is written to docs/results/<name>.json; docs/results.md is generated from all
records. The runner lives in benchmarks/study/ (beside the recipes it drives, not in the installed package).
"""
import argparse
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import benchmarks.study as S  # noqa: E402
from ncl_hub.config import ConfigError  # noqa: E402


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} vCPUs ({cpu}), torch {torch.__version__}"


def _dry_run(study, only, seeds, results_dir: Path) -> None:
    """Print each run's train.py command and state, and where the runs of methods taken from a record come from."""
    for method in study.taken(only):
        _, src = S.read_source(method, results_dir)  # a missing record or method is an error here already
        have = [s for s in study.seeds_of(method) if (seeds is None or s in seeds) and str(s) in src["runs"]]
        record = results_dir / f"{method.taken_from.split('/')[0]}.json"
        print(f"[from] {method.name}: the runs of {method.taken_from} in {record} "
              f"(seeds {', '.join(map(str, have)) or 'none finished'})")
    for method, seed in study.runs(only, seeds):
        run_dir = study.run_dir(method.name, seed)
        state = "done" if S.is_finished(run_dir) else "resume" if (run_dir / "checkpoints").is_dir() else "new"
        print(f"[{state}] python recipes/train.py {' '.join(S.run_argv(study, method, seed))}")


def _dry_run_deployment(study, only, seeds) -> None:
    """Print each evaluation's evaluate.py command and state: done, new, or waiting for its run to finish."""
    for _, _, run_dir in study.evaluations(only, seeds):
        state = "done" if study.is_evaluated(run_dir) else "new" if S.is_finished(run_dir) else "waiting"
        print(f"[{state}] python recipes/evaluate.py {' '.join(S.evaluate_argv(study, run_dir))}")


def _run_and_collect(study, args, only, seeds, results_dir: Path):
    """Run the study (unless ``--report``) and collect its record: (record, the runs or evaluations that failed)."""
    deployment = isinstance(study, S.DeploymentStudy)
    failed = []
    if not args.report:
        run = S.run_evaluations if deployment else S.run_study
        failed = run(study, jobs=args.jobs, threads=args.threads, only=only, seeds=seeds)
    record = S.collect_deployment(study) if deployment else S.collect(study, results_dir)
    record["machine"] = _machine()
    return record, failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="study file (YAML)")
    p.add_argument("--report", action="store_true",
                   help="do not train or evaluate: collect finished runs and regenerate")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: CPUs / jobs)")
    p.add_argument("--only", default=None, help="comma-separated method names to run")
    p.add_argument("--seeds", default=None, help="comma-separated seeds to run (default: the study's)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each run's train.py (deployment study: evaluate.py) command and state")
    p.add_argument("--results-dir", default=str(REPO / "docs" / "results"), help="where study records go")
    p.add_argument("--markdown", default=str(REPO / "docs" / "results.md"), help="the generated results page")
    args = p.parse_args(argv)
    if not args.config and not args.report:
        p.error("give --config STUDY.yaml, or --report to regenerate the results page")
    try:
        failed = []
        if args.config:
            study = S.load_study(args.config)
            only = args.only.split(",") if args.only else None
            seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
            if args.dry_run:
                if isinstance(study, S.DeploymentStudy):
                    _dry_run_deployment(study, only, seeds)
                else:
                    _dry_run(study, only, seeds, Path(args.results_dir))
                return 0
            record, failed = _run_and_collect(study, args, only, seeds, Path(args.results_dir))
            out = Path(args.results_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{study.name}.json").write_text(json.dumps(record, indent=1))
            print(f"wrote {out / (study.name + '.json')}")
        path = S.write_results(Path(args.results_dir), Path(args.markdown))
        print(f"wrote {path}")
        if failed:
            print(f"{len(failed)} run(s) or evaluation(s) failed: " + ", ".join(map(str, failed)))
            return 1
        return 0
    except (ConfigError, ImportError) as e:  # ImportError: matplotlib, for a schedule figure, is not installed
        if argv is not None:
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
