"""Seeded studies: a grid of training configurations x seeds, run, resumed and reported from the run folders.

A study file (YAML) names a base training config, overrides common to every run, the methods (each a set of
overrides) and the seeds::

    name: cifar10_lt_cpu
    title: CIFAR-10-LT IF 100, 20 epochs on a 2-core CPU
    description: what the study asks (markdown, shown above its tables; no hand-typed results)
    config: ../configs/cifar10_lt_if100.yaml     # relative to the study file
    output_root: outputs/studies/cifar10_lt_cpu  # relative to the working directory
    seeds: [0, 1, 2]
    common: {epochs: 20, moco.enabled: false}
    methods:
      bsce_k1: {label: "BSCE, 1 x ResNet-32", overrides: {loss.name: bsce, model.num_experts: 1}}
      ncl_paper: {label: "NCL (paper), 3 x ResNet-32", overrides: {loss.variant: paper}}
    baseline: bsce_k1          # differences are reported against it, paired by seed
    findings: |                # optional prose under the tables; {{ncl_paper:test/single/top1}} is replaced by
      ...                      # that summary's mean ± std, {{diff:ncl_paper:test/single/top1}} by the paired
                               # difference to the baseline, so no number in it is typed by hand
    position: 1                # optional: the study's place on docs/results.md (then by name)

Each run is ``recipes/train.py`` in a subprocess (its log in ``<run>/train.log``), started with
``--resume latest``: a finished run (``eval/metrics.json``) is skipped, a killed one continues from its last
checkpoint. ``collect`` reads the run folders into one JSON record; ``render_markdown`` turns records into the
tables of ``docs/results.md``. Nothing in the tables is typed by hand.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .config import ConfigError, config_from_dict, config_to_dict, parse_args

__all__ = ["Study", "Method", "load_study", "run_argv", "run_study", "collect", "render_markdown", "write_results"]

GROUPS = ("top1", "many", "medium", "few")
_IGNORED_KEYS = {"resume", "overwrite", "output_dir"}  # may differ between starts of the same run


@dataclass
class Method:
    name: str
    label: str
    overrides: Dict[str, Any]


@dataclass
class Study:
    name: str
    title: str
    description: str
    config: Path
    output_root: Path
    seeds: List[int]
    common: Dict[str, Any]
    methods: List[Method]
    baseline: Optional[str] = None
    findings: str = ""
    position: Optional[int] = None  # where docs/results.md places the study (lowest first; then by name)
    source: Optional[Path] = None
    extra_args: List[str] = field(default_factory=list)

    def run_dir(self, method: str, seed: int) -> Path:
        return self.output_root / method / f"seed_{seed}"

    def runs(self, only: Optional[Sequence[str]] = None,
             seeds: Optional[Sequence[int]] = None) -> List[Tuple[Method, int]]:
        """Every (method, seed), seed-major: an interrupted study has every method at the same seeds. ``only`` and
        ``seeds`` narrow it to some methods and seeds of the study; a name or seed the study lacks is an error."""
        names = [m.name for m in self.methods]
        unknown = [x for x in only or () if x not in names] + [x for x in seeds or () if x not in self.seeds]
        if unknown:
            raise ConfigError(f"study {self.name} has no method or seed {', '.join(map(str, unknown))}; its methods "
                              f"are {', '.join(names)} and its seeds {', '.join(map(str, self.seeds))}")
        return [(m, s) for s in self.seeds for m in self.methods
                if (not only or m.name in only) and (seeds is None or s in seeds)]


def load_study(path) -> Study:
    """Read and check a study file; every run's configuration is resolved once here, so a typo in an override
    is an error before anything trains."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in ("name", "config", "seeds", "methods") if k not in data]
    if missing:
        raise ConfigError(f"{path}: study file lacks {', '.join(missing)}")
    unknown = set(data) - {"name", "title", "description", "findings", "config", "output_root", "seeds", "common",
                           "methods", "baseline", "position"}
    if unknown:
        raise ConfigError(f"{path}: unknown study keys {sorted(unknown)}")
    methods = []
    for name, spec in data["methods"].items():
        spec = spec or {}
        methods.append(Method(name=name, label=spec.get("label", name), overrides=dict(spec.get("overrides") or {})))
    study = Study(
        name=data["name"], title=data.get("title", data["name"]), description=data.get("description", "").strip(),
        config=(path.parent / data["config"]).resolve(), output_root=Path(data.get("output_root",
                                                                                 f"outputs/studies/{data['name']}")),
        seeds=[int(s) for s in data["seeds"]], common=dict(data.get("common") or {}), methods=methods,
        baseline=data.get("baseline"), findings=(data.get("findings") or "").strip(),
        position=None if data.get("position") is None else int(data["position"]), source=path)
    if study.baseline is not None and study.baseline not in {m.name for m in methods}:
        raise ConfigError(f"{path}: baseline {study.baseline!r} is not one of the methods {[m.name for m in methods]}")
    for method, seed in study.runs():
        parse_args(run_argv(study, method, seed))  # raises ConfigError naming a bad key or value
    return study


def _as_cli(overrides: Dict[str, Any]) -> List[str]:
    argv = []
    for key, value in overrides.items():
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
        argv += [f"--{key}", "null" if value is None else text]
    return argv


def run_argv(study: Study, method: Method, seed: int) -> List[str]:
    """The ``recipes/train.py`` arguments of one run (without ``--resume``)."""
    return ["--config", str(study.config), *_as_cli(study.common), *_as_cli(method.overrides), "--seed", str(seed),
            "--output_dir", str(study.run_dir(method.name, seed)), *study.extra_args]


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "eval" / "metrics.json").is_file() and (run_dir / "run_info.json").is_file()


def _check_same_config(run_dir: Path, argv: List[str]) -> None:
    """A run folder started with other settings is not resumed with these: the study would mix two runs."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:  # through the config parser: keys added since the run started get their defaults
        old = _flat(config_to_dict(config_from_dict(yaml.safe_load(saved.read_text()) or {})))
    except ConfigError as e:
        raise ConfigError(f"{run_dir} holds a run whose settings this version cannot read ({e}). Delete the folder "
                          "to rerun it.") from None
    new = _flat(config_to_dict(parse_args(argv)))
    diff = sorted(k for k in set(old) | set(new) if k not in _IGNORED_KEYS and old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"{run_dir} holds a run with other settings ({shown}). Delete the folder to rerun it, or "
                          "restore the study file.")


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "loss", "moco", "data", "optim"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


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
    script = Path(train_script or Path(__file__).resolve().parents[1] / "recipes" / "train.py")
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
            run_dir.mkdir(parents=True, exist_ok=True)
            logf = open(run_dir / "train.log", "a")
            logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {sys.executable} {script} "
                       f"{' '.join(argv)} --resume latest\n")
            logf.flush()
            proc = subprocess.Popen([sys.executable, str(script), *argv, "--resume", "latest"], stdout=logf,
                                    stderr=subprocess.STDOUT, env=env)
            (run_dir / ".lock").write_text(str(proc.pid))
            running.append((run_dir, proc, logf))
            log(f"started  {run_dir} (pid {proc.pid}, {threads} thread(s))")
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


# ---------------------------------------------------------------------------------------------- collect
def _run_record(run_dir: Path) -> Dict[str, Any]:
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    selected = metrics.get("selected_expert", info.get("selected_expert", 0))
    splits = {}
    for split, m in metrics["splits"].items():
        single = m["experts"][selected] if m.get("experts") else m["ensemble"]
        per_class = m.get("per_class_accuracy") or {}
        splits[split] = {"single": {g: single.get(g) for g in GROUPS},
                         "ensemble": {g: m["ensemble"].get(g) for g in GROUPS},
                         "per_class_single": per_class["experts"][selected] if per_class.get("experts") else None,
                         "per_class_ensemble": per_class.get("ensemble"),
                         "pairwise_kl": m.get("pairwise_kl")}
    history = [{k: h.get(k) for k in ("epoch", "step", "lr", "train_loss", "train_nil_all", "train_nil_hard",
                                       "train_nbod_all", "train_nbod_hard", "train_ce", "val_top1",
                                       "val_expert_top1") if k in h} for h in info.get("history", [])]
    return {"splits": splits, "selected_expert": selected, "best_epoch": info.get("best_epoch"),
            "wall_time_s": info.get("wall_time_s"), "train_time_s": _train_time(info), "commit": info.get("commit"),
            "class_counts": info.get("class_counts"), "history": history}


def _train_time(info: Dict[str, Any]) -> Optional[float]:
    """Seconds spent in the training epochs, summed over every process that trained the run: unlike the last
    process's wall time, this counts the epochs before a kill and resume."""
    times = [h.get("time_s") for h in info.get("history", [])]
    return round(sum(times), 1) if times and all(t is not None for t in times) else None


def _stats(values: List[Optional[float]]) -> Dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": values}


def collect(study: Study) -> Dict[str, Any]:
    """Read every finished run of ``study`` into one record: per method and seed the run's numbers, and per method
    mean and sample standard deviation over seeds; paired differences to the baseline (same seeds)."""
    methods: Dict[str, Any] = {}
    for method in study.methods:
        runs = {}
        for seed in study.seeds:
            run_dir = study.run_dir(method.name, seed)
            if is_finished(run_dir):
                runs[str(seed)] = _run_record(run_dir)
        summary: Dict[str, Any] = {}
        for split in ("val", "test"):
            for model in ("single", "ensemble"):
                for g in GROUPS:
                    vals = [r["splits"].get(split, {}).get(model, {}).get(g) for r in runs.values()]
                    if any(v is not None for v in vals):
                        summary[f"{split}/{model}/{g}"] = _stats(vals)
        summary["wall_time_s"] = _stats([r["wall_time_s"] for r in runs.values()])
        summary["train_time_s"] = _stats([r.get("train_time_s") for r in runs.values()])
        summary["test/pairwise_kl"] = _stats([r["splits"].get("test", {}).get("pairwise_kl") for r in runs.values()])
        for model in ("single", "ensemble"):
            rows = [r["splits"].get("test", {}).get(f"per_class_{model}") for r in runs.values()]
            rows = [row for row in rows if row]
            if rows:
                summary[f"test/per_class_{model}"] = [
                    sum(row[c] for row in rows if row[c] is not None) / max(1, sum(row[c] is not None for row in rows))
                    for c in range(len(rows[0]))]
        methods[method.name] = {"label": method.label, "overrides": method.overrides, "runs": runs,
                                "summary": summary}
    record = {"name": study.name, "position": study.position,
              "title": study.title, "description": study.description, "findings": study.findings,
              "study_file": str(study.source) if study.source else None, "config": _repo_relative(study.config),
              "common": study.common, "seeds": study.seeds, "baseline": study.baseline, "methods": methods,
              "commits": sorted({r["commit"] for m in methods.values() for r in m["runs"].values() if r["commit"]})}
    if study.baseline:
        record["differences"] = _differences(methods, study.baseline)
    return record


def _differences(methods: Dict[str, Any], baseline: str) -> Dict[str, Any]:
    base = methods[baseline]["runs"]
    out = {}
    for name, m in methods.items():
        if name == baseline:
            continue
        seeds = sorted(set(m["runs"]) & set(base), key=int)
        diff = {}
        for model in ("single", "ensemble"):
            for g in GROUPS:
                vals = []
                for s in seeds:
                    a = m["runs"][s]["splits"].get("test", {}).get(model, {}).get(g)
                    b = base[s]["splits"].get("test", {}).get("single", {}).get(g)
                    vals.append(None if a is None or b is None else a - b)
                if any(v is not None for v in vals):
                    diff[f"test/{model}/{g}"] = _stats(vals)
        out[name] = {"seeds": [int(s) for s in seeds], "vs_baseline_single": diff}
    return out


def _repo_relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------- report
def _fmt(stat: Optional[Dict[str, Any]], with_values: bool = True, signed: bool = False) -> str:
    if not stat or stat["mean"] is None:
        return "n/a"
    sign = "+" if signed else ""
    if stat["n"] == 1:  # no spread to show: say so rather than print "± 0.00"
        return f"{stat['mean']:{sign}.2f} (1 seed)"
    text = f"{stat['mean']:{sign}.2f} ± {stat['std']:.2f}"
    if with_values:
        text += " (" + ", ".join("-" if v is None else f"{v:{sign}.1f}" for v in stat["values"]) + ")"
    return text


def _present_groups(record: Dict[str, Any]) -> List[str]:
    return [g for g in GROUPS if any(f"test/single/{g}" in m["summary"] for m in record["methods"].values())]


def render_study(record: Dict[str, Any]) -> str:
    """The markdown section of one study record: setting, test and validation tables, differences, curves."""
    groups = _present_groups(record)
    names = {"top1": "overall", "many": "many", "medium": "medium", "few": "few"}
    lines = [f"## {record['title']}", "", fill_numbers(record["description"], record), ""]
    common = " ".join(f"--{k} {json.dumps(v) if not isinstance(v, str) else v}" for k, v in record["common"].items())
    lines += [f"Config `{record['config']}` with `{common}`; seeds {record['seeds']}; study file "
              f"`{record.get('study_file')}`; code at commit(s) {', '.join(record['commits']) or 'unknown'}.", ""]
    lines += ["Test top-1 (%), mean ± standard deviation over seeds (each seed's value in brackets, in seed order). "
              "*single*: the expert chosen on validation at the epoch chosen on validation; *ensemble*: the mean of "
              "the experts' logits. *training time*: mean seconds per run in its training epochs, summed over a "
              "killed run's processes (on a shared machine, runs that overlapped slow each other).", ""]
    header = "| method | runs | model | " + " | ".join(names[g] for g in groups) + " | training time (s) |"
    lines += [header, "|" + "---|" * 3 + "---:|" * (len(groups) + 1)]
    for name, m in record["methods"].items():
        s = m["summary"]
        n = s["wall_time_s"]["n"]
        if not m["runs"]:
            lines.append(f"| {m['label']} | 0 | no finished run yet | " + " | ".join("" for _ in groups) + " | |")
            continue
        k1 = all(r["splits"].get("test", {}).get("single") == r["splits"].get("test", {}).get("ensemble")
                 for r in m["runs"].values())
        for model in (("single",) if k1 else ("single", "ensemble")):
            cells = [_fmt(s.get(f"test/{model}/{g}")) for g in groups]
            t = s.get("train_time_s") or {}
            train_time = f"{t['mean']:.0f}" if t.get("mean") is not None and model == "single" else ""
            lines.append(f"| {m['label']} | {n} | {model if not k1 else 'single (K = 1)'} | " + " | ".join(cells)
                         + f" | {train_time} |")
    lines.append("")
    if record.get("differences"):
        base = record["methods"][record["baseline"]]["label"]
        lines += [f"Paired differences to **{base}** (test top-1 points, same seeds; mean ± standard deviation, "
                  "each seed's difference in brackets):", ""]
        lines += ["| method | model | " + " | ".join(names[g] for g in groups) + " |",
                  "|---|---|" + "---:|" * len(groups)]
        for name, d in record["differences"].items():
            for model in ("single", "ensemble"):
                cells = [_fmt(d["vs_baseline_single"].get(f"test/{model}/{g}"), signed=True) for g in groups]
                if any(c != "n/a" for c in cells):
                    lines.append(f"| {record['methods'][name]['label']} | {model} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Validation top-1 (%) of the same selection (what the runs were selected on), and the selected epoch:",
              "", "| method | single | ensemble | best epoch (per seed) |", "|---|---:|---:|---|"]
    for name, m in record["methods"].items():
        s = m["summary"]
        if not m["runs"]:
            continue
        epochs = ", ".join(str(r["best_epoch"]) for r in m["runs"].values())
        lines.append(f"| {m['label']} | {_fmt(s.get('val/single/top1'), False)} | "
                     f"{_fmt(s.get('val/ensemble/top1'), False)} | {epochs} |")
    lines.append("")
    lines += _render_per_class(record)
    lines += _render_curves(record)
    if record.get("findings"):
        lines += ["### What the numbers say", "", fill_numbers(record["findings"], record), ""]
    return "\n".join(lines)


def fill_numbers(text: str, record: Dict[str, Any]) -> str:
    """Replace ``{{METHOD:KEY}}`` with the method's mean ± std of a summary key (``test/single/top1``), and
    ``{{diff:METHOD:KEY}}`` with its paired difference to the baseline: prose quotes numbers without typing them."""
    import re

    def value(match: "re.Match[str]") -> str:
        parts = match.group(1).split(":")
        try:
            if parts[0] == "diff":
                stat = record["differences"][parts[1]]["vs_baseline_single"].get(parts[2])
                return _fmt(stat, False, signed=True) if stat else "n/a"
            return _fmt(record["methods"][parts[0]]["summary"].get(parts[1]), False)
        except (KeyError, IndexError):
            raise ValueError(f"study text refers to {match.group(0)}, which the record does not have") from None

    return re.sub(r"\{\{([^}]+)\}\}", value, text)


def _render_per_class(record: Dict[str, Any], max_classes: int = 20) -> List[str]:
    """Test accuracy per class (mean over seeds), classes in training-count order: where a method wins or loses."""
    counts = next((r["class_counts"] for m in record["methods"].values() for r in m["runs"].values()
                   if r.get("class_counts")), None)
    if not counts or len(counts) > max_classes:
        return []
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    lines = ["Test accuracy per class (%, mean over seeds), classes by training images (in brackets):", "",
             "| method | model | " + " | ".join(f"{c} ({counts[c]})" for c in order) + " | mean pairwise KL |",
             "|---|---|" + "---:|" * (len(order) + 1)]
    for m in record["methods"].values():
        for model in ("single", "ensemble"):
            row = m["summary"].get(f"test/per_class_{model}")
            if not row or (model == "ensemble" and row == m["summary"].get("test/per_class_single")):
                continue
            kl = m["summary"].get("test/pairwise_kl")
            kl_text = f"{kl['mean']:.3f}" if model == "ensemble" and kl and kl["mean"] is not None else ""
            lines.append(f"| {m['label']} | {model} | " + " | ".join(f"{row[c]:.1f}" for c in order)
                         + f" | {kl_text} |")
    return lines + [""]


def _render_curves(record: Dict[str, Any], points: int = 6) -> List[str]:
    """Mean validation top-1 (ensemble) and training loss at a few epochs: how the methods got there."""
    any_runs = [r for m in record["methods"].values() for r in m["runs"].values() if r["history"]]
    if not any_runs:
        return []
    epochs = max(len(r["history"]) for r in any_runs)
    marks = sorted({max(1, round(epochs * i / points)) for i in range(1, points + 1)} | {1})
    lines = ["Training curves, mean over seeds: validation ensemble top-1 (%) / mean training loss per expert at "
             "the end of each epoch shown:", "",
             "| method | " + " | ".join(f"epoch {e}" for e in marks) + " |", "|---|" + "---:|" * len(marks)]
    for m in record["methods"].values():
        if not m["runs"]:
            continue
        cells = []
        for e in marks:
            vals, losses = [], []
            for r in m["runs"].values():
                h = next((x for x in r["history"] if x.get("epoch") == e), None)
                if h is None:
                    continue
                if h.get("val_top1") is not None:
                    vals.append(h["val_top1"])
                k = len(h.get("val_expert_top1") or [1])
                loss = h.get("train_nil_all", h.get("train_ce"))
                if loss is not None:
                    losses.append(loss / k)
            cells.append((f"{sum(vals) / len(vals):.1f}" if vals else "-") + " / "
                         + (f"{sum(losses) / len(losses):.3f}" if losses else "-"))
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    lines += ["", "The loss shown is the all-class Balanced Softmax cross-entropy per expert (NCL's `nil_all` / K, "
              "the baselines' loss / K): the same quantity for every method.", ""]
    return lines


HEADER = """# Results

Generated by `python recipes/study.py --report` from the study records in `docs/results/*.json`, which
`python recipes/study.py --config STUDY.yaml` writes from its run folders. No number on this page is typed by
hand; to change it, rerun the study or edit the study file. Machine: {machine}.
"""


def render_markdown(records: Sequence[Dict[str, Any]], machine: str = "see each study") -> str:
    parts = [HEADER.format(machine=machine)]
    parts += [render_study(r) for r in records]
    return "\n".join(parts).rstrip() + "\n"


def write_results(records_dir: Path, markdown_path: Path, *, order: Optional[Sequence[str]] = None) -> Path:
    """Regenerate ``markdown_path`` from every ``*.json`` record in ``records_dir`` (in ``order`` first)."""
    records = [json.loads(p.read_text()) for p in sorted(Path(records_dir).glob("*.json"))]
    rank = {n: i for i, n in enumerate(order or [])}
    records.sort(key=lambda r: (rank.get(r["name"], len(rank)),
                                r["position"] if r.get("position") is not None else math.inf, r["name"]))
    machines = sorted({r.get("machine") for r in records if r.get("machine")})
    markdown_path.write_text(render_markdown(records, machine="; ".join(machines) or "see each study"))
    return markdown_path
