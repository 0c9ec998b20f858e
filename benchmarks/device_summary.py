#!/usr/bin/env python
"""The JSON summary of ``benchmarks/device_reproduce.sh``: what one training run folder says about speed and
accuracy (run_info.json and eval/metrics.json of a finished run; the newest checkpoint's progress.json of a run that
was stopped), plus what the script measured around it.

    python benchmarks/device_summary.py RUN_DIR --wall-s 512 --exit-code 0 --out summary.json [--extra KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

PAPER = {"single": 84.7, "ensemble": 85.5}  # CIFAR-10-LT IF 100, NCL, REFERENCE.md


def _history(run_dir: Path) -> Optional[Dict[str, Any]]:
    """run_info.json of a finished run, else the progress.json of its newest checkpoint."""
    info = run_dir / "run_info.json"
    if info.is_file():
        return json.loads(info.read_text())
    progress = sorted(run_dir.glob("checkpoints/*/progress.json"),
                      key=lambda p: json.loads(p.read_text())["global_step"])
    return json.loads(progress[-1].read_text()) if progress else None


def _rates(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    rates = [h["images_per_s"] for h in history if "images_per_s" in h]
    steady = rates[1:] or rates  # the first epoch compiles
    seconds = sum(h.get("time_s", 0.0) for h in history)
    return {"epoch_images_per_s_first": rates[0] if rates else None,
            "epoch_images_per_s_mean_after_first": round(sum(steady) / len(steady), 1) if steady else None,
            "epoch_images_per_s_min_after_first": min(steady) if steady else None,
            "training_seconds_in_epochs": round(seconds, 1)}


def summarise(run_dir: Path, wall_s: float, exit_code: int, extra: Dict[str, str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"run_dir": str(run_dir), "exit_code": exit_code, "wall_time_s": round(wall_s, 1),
                           "finished": (run_dir / "run_info.json").is_file(), "paper_top1": PAPER, **extra}
    state = _history(run_dir)
    if state is None:
        out["error"] = "no run_info.json and no checkpoint: the run stopped before its first epoch ended"
        return out
    history = state.get("history", [])
    out.update(epochs_done=len(history), epochs=state.get("epochs"), best_epoch=state.get("best_epoch"),
               selected_expert=state.get("selected_expert"), **_rates(history))
    if history:
        out["last_epoch"] = history[-1]
    metrics_file = run_dir / "eval" / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        test = metrics["splits"].get("test", {})
        k = metrics.get("selected_expert", out["selected_expert"])
        if test:
            out["test_top1"] = {"single": test["experts"][k]["top1"], "ensemble": test["ensemble"]["top1"],
                                "experts": [e["top1"] for e in test["experts"]], "num_samples": test["num_samples"]}
        if "val" in metrics["splits"]:
            out["val_top1_ensemble"] = metrics["splits"]["val"]["ensemble"]["top1"]
    return out


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--wall-s", type=float, required=True, help="wall time of the run, measured by the caller")
    p.add_argument("--exit-code", type=int, required=True, help="the run's exit status (124: stopped by timeout)")
    p.add_argument("--out", required=True)
    p.add_argument("--extra", nargs="*", default=[], help="KEY=VALUE pairs copied into the summary")
    args = p.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.extra)
    summary = summarise(Path(args.run_dir), args.wall_s, args.exit_code, extra)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "last_epoch"}, indent=2))
    return summary


if __name__ == "__main__":
    main()
