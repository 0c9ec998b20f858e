"""Run a study: start its unfinished runs as ``recipes/train.py`` subprocesses, a few at a time; or, for a deployment
study, the ``recipes/evaluate.py`` evaluations of another study's finished runs.

Each run is started with ``--resume latest`` (its log in ``<run>/train.log``): a finished run
(``eval/metrics.json``) is skipped, a killed one continues from its last checkpoint, and a run another runner
holds (a live ``.lock``) is left to it, so several runners can share one study. A deployment evaluation is
skipped once its ``metrics.json`` is written, waits while its run trains, and is locked by ``<run>/<out>.lock``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ncl_hub.config import ConfigError, flat_config, load_config, parse_args

from .study import REPO, DeploymentStudy, Study, evaluate_argv, is_finished, run_argv

_IGNORED_KEYS = {"resume", "overwrite", "output_dir"}  # may differ between starts of the same run


def _check_same_config(run_dir: Path, argv: List[str]) -> None:
    """A run folder started with other settings is not resumed with these: the study would mix two runs."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:  # through the config parser: keys added since the run started get their defaults
        old = flat_config(load_config(saved))
    except ConfigError as e:
        raise ConfigError(f"{run_dir} holds a run whose settings this version cannot read ({e}). Delete the folder "
                          "to rerun it.") from None
    new = flat_config(parse_args(argv))
    diff = sorted(k for k in set(old) | set(new) if k not in _IGNORED_KEYS and old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"{run_dir} holds a run with other settings ({shown}). Delete the folder to rerun it, or "
                          "restore the study file.")


def _lock_owner(lock: Path) -> Optional[int]:
    """The pid of a live process that holds ``lock`` (a run's ``.lock`` file), else None (a stale lock is ignored)."""
    try:
        pid = int(lock.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


@dataclass
class _Job:
    """One subprocess of a study: a training run or a deployment evaluation."""
    folder: Path  # what it writes, named in the runner's lines
    command: List[str]
    log: Path  # its output, appended
    lock: Path  # holds its pid while it runs
    done: Callable[[], bool]  # whether its result is written


def run_study(study: Study, *, jobs: int = 1, threads: Optional[int] = None, train_script: Optional[Path] = None,
              only: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None, log=print) -> List[Path]:
    """Run every unfinished run of ``study`` (``jobs`` at a time, each in its own process with ``threads`` torch
    threads, default: the CPU count divided by ``jobs``); finished runs are skipped, killed ones resumed, and runs
    that another runner holds (a live ``.lock``) are left to it, so several runners can share one study.

    Returns the run folders that failed (their ``train.log`` says why); the others are finished or held elsewhere.
    """
    script = Path(train_script or REPO / "recipes" / "train.py")
    pending = []
    for method, seed in study.runs(only, seeds):
        run_dir = study.run_dir(method.name, seed)
        if is_finished(run_dir):
            log(f"done     {run_dir}")
            continue
        argv = run_argv(study, method, seed)
        _check_same_config(run_dir, argv)
        pending.append(_Job(run_dir, [sys.executable, str(script), *argv, "--resume", "latest"],
                            run_dir / "train.log", run_dir / ".lock", partial(is_finished, run_dir)))
    return _run_jobs(pending, jobs=jobs, threads=threads, log=log)


def run_evaluations(study: DeploymentStudy, *, jobs: int = 1, threads: Optional[int] = None,
                    evaluate_script: Optional[Path] = None, only: Optional[Sequence[str]] = None,
                    seeds: Optional[Sequence[int]] = None, log=print) -> List[Path]:
    """Evaluate every finished run of a deployment study that is not evaluated yet (``recipes/evaluate.py``, ``jobs``
    at a time, as :func:`run_study`); runs still training are listed as waiting, evaluations another runner holds
    (a live ``RUN/<out>.lock``) are left to it.

    Returns the evaluation folders that failed (``RUN/<out>.log`` says why).
    """
    script = Path(evaluate_script or REPO / "recipes" / "evaluate.py")
    pending = []
    for _, _, run_dir in study.evaluations(only, seeds):
        out = study.out_dir(run_dir)
        if study.is_evaluated(run_dir):
            log(f"done     {out}")
        elif not is_finished(run_dir):
            log(f"waiting  {run_dir} (training not finished)")
        else:
            pending.append(_Job(out, [sys.executable, str(script), *evaluate_argv(study, run_dir)],
                                run_dir / f"{study.out}.log", run_dir / f"{study.out}.lock",
                                partial(study.is_evaluated, run_dir)))
    return _run_jobs(pending, jobs=jobs, threads=threads, log=log)


def _run_jobs(pending: List[_Job], *, jobs: int, threads: Optional[int], log) -> List[Path]:
    """Run ``pending`` ``jobs`` at a time with ``threads`` torch threads each (default: the CPU count divided by
    ``jobs``), leaving a job another process holds or that is done meanwhile; returns the folders that failed."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending = list(pending)
    running: List[Tuple[_Job, subprocess.Popen, Any]] = []
    failed: List[Path] = []
    while pending or running:
        while pending and len(running) < jobs:
            job = pending.pop(0)
            owner = _lock_owner(job.lock)
            if owner is not None or job.done():
                log(f"skipped  {job.folder} ({'finished meanwhile' if owner is None else f'held by pid {owner}'})")
                continue
            running.append(_start(job, env))
            log(f"started  {job.folder} (pid {running[-1][1].pid}, {threads} thread(s))")
        time.sleep(0.5)
        for item in list(running):
            job, proc, logf = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.close()
            job.lock.unlink(missing_ok=True)
            if proc.returncode == 0 and job.done():
                log(f"finished {job.folder}")
            else:
                failed.append(job.folder)
                log(f"FAILED   {job.folder} (exit {proc.returncode}; see {job.log})")
    return failed


def _start(job: _Job, env: Dict[str, str]) -> Tuple[_Job, subprocess.Popen, Any]:
    """Start one job in its own process, its output appended to its log, its pid in its lock file."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    logf = open(job.log, "a")
    logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(job.command)}\n")
    logf.flush()
    proc = subprocess.Popen(job.command, stdout=logf, stderr=subprocess.STDOUT, env=env)
    job.lock.write_text(str(proc.pid))
    return job, proc, logf
