"""Run a study: start its unfinished runs as ``recipes/train.py`` subprocesses, a few at a time.

Each run is started with ``--resume latest`` (its log in ``<run>/train.log``): a finished run
(``eval/metrics.json``) is skipped, a killed one continues from its last checkpoint, and a run another runner
holds (a live ``.lock``) is left to it, so several runners can share one study.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ncl_hub.config import ConfigError, flat_config, load_config, parse_args

from .study import REPO, Study, is_finished, run_argv

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


def _lock_owner(run_dir: Path) -> Optional[int]:
    """The pid of a live process that holds ``run_dir`` (its ``.lock`` file), else None (a stale lock is ignored)."""
    try:
        pid = int((run_dir / ".lock").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def run_study(study: Study, *, jobs: int = 1, threads: Optional[int] = None, train_script: Optional[Path] = None,
              only: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None, log=print) -> List[Path]:
    """Run every unfinished run of ``study`` (``jobs`` at a time, each in its own process with ``threads`` torch
    threads, default: the CPU count divided by ``jobs``); finished runs are skipped, killed ones resumed, and runs
    that another runner holds (a live ``.lock``) are left to it, so several runners can share one study.

    Returns the run folders that failed (their ``train.log`` says why); the others are finished or held elsewhere.
    """
    script = Path(train_script or REPO / "recipes" / "train.py")
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    pending = []
    for method, seed in study.runs(only, seeds):
        run_dir = study.run_dir(method.name, seed)
        if is_finished(run_dir):
            log(f"done     {run_dir}")
            continue
        argv = run_argv(study, method, seed)
        _check_same_config(run_dir, argv)
        pending.append((run_dir, argv))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running: List[Tuple[Path, subprocess.Popen, Any]] = []
    failed: List[Path] = []
    while pending or running:
        while pending and len(running) < jobs:
            run_dir, argv = pending.pop(0)
            owner = _lock_owner(run_dir)
            if owner is not None or is_finished(run_dir):
                log(f"skipped  {run_dir} ({'finished meanwhile' if owner is None else f'held by pid {owner}'})")
                continue
            running.append(_start(script, run_dir, argv, env))
            log(f"started  {run_dir} (pid {running[-1][1].pid}, {threads} thread(s))")
        time.sleep(0.5)
        for item in list(running):
            run_dir, proc, logf = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.close()
            (run_dir / ".lock").unlink(missing_ok=True)
            if proc.returncode == 0 and is_finished(run_dir):
                log(f"finished {run_dir}")
            else:
                failed.append(run_dir)
                log(f"FAILED   {run_dir} (exit {proc.returncode}; see {run_dir / 'train.log'})")
    return failed


def _start(script: Path, run_dir: Path, argv: List[str], env: Dict[str, str]) -> Tuple[Path, subprocess.Popen, Any]:
    """Start one run in its own process, its output appended to ``<run>/train.log``, its pid in ``<run>/.lock``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logf = open(run_dir / "train.log", "a")
    logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {sys.executable} {script} "
               f"{' '.join(argv)} --resume latest\n")
    logf.flush()
    proc = subprocess.Popen([sys.executable, str(script), *argv, "--resume", "latest"], stdout=logf,
                            stderr=subprocess.STDOUT, env=env)
    (run_dir / ".lock").write_text(str(proc.pid))
    return run_dir, proc, logf
