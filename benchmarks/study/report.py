"""Report studies: their records turned into the markdown of ``docs/results.md`` (setting, test and validation
tables, paired differences, the schedule-length table and figure of a study with series, per-class accuracy,
training curves, findings; a deployment study's section comes from :mod:`.deployment_report`). Nothing in it is
typed by hand."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .deployment_report import render_deployment
from .figure import plot_schedule
from .record import METRIC_KEYS, schedule_grid
from .stats import _fmt

_GROUP_NAMES = {"top1": "overall", "many": "many", "medium": "medium", "few": "few"}


def _present_groups(record: Dict[str, Any]) -> List[str]:
    return [g for g in METRIC_KEYS if any(f"test/single/{g}" in m["summary"] for m in record["methods"].values())]


def _label(m: Dict[str, Any], record: Dict[str, Any]) -> str:
    """A method's row label; in a study with series its labels name the family, so the epochs are added."""
    if record.get("series") and m.get("epochs") is not None:
        return f"{m['label']}, {m['epochs']} epochs"
    return m["label"]


def render_study(record: Dict[str, Any], figure_dir: str = "results") -> str:
    """The markdown section of one study record: setting, test and validation tables, differences, the schedule
    table and figure (a study with series; the figure linked as ``figure_dir/<name>_schedule.png``), curves."""
    groups = _present_groups(record)
    lines = _render_setting(record)
    lines += _render_test(record, groups)
    lines += _render_differences(record, groups)
    lines += _render_schedule(record, figure_dir)
    lines += _render_validation(record)
    lines += _render_per_class(record)
    lines += _render_curves(record)
    if record.get("findings"):
        lines += ["### What the numbers say", "", fill_numbers(record["findings"], record), ""]
    return "\n".join(lines)


def _render_setting(record: Dict[str, Any]) -> List[str]:
    lines = [f"## {record['title']}", "", fill_numbers(record["description"], record), ""]
    common = " ".join(f"--{k} {json.dumps(v) if not isinstance(v, str) else v}" for k, v in record["common"].items())
    return lines + [f"Config `{record['config']}` with `{common}`; seeds {record['seeds']}; study file "
                    f"`{record.get('study_file')}`; code at commit(s) {', '.join(record['commits']) or 'unknown'}.", ""]


def _render_test(record: Dict[str, Any], groups: List[str]) -> List[str]:
    lines = ["Test top-1 (%), mean ± standard deviation over seeds (each seed's value in brackets, in seed order). "
             "*single*: the expert chosen on validation at the epoch chosen on validation; *ensemble*: the mean of "
             "the experts' logits. *training time*: mean seconds per run in its training epochs, summed over a "
             "killed run's processes (on a shared machine, runs that overlapped slow each other).", ""]
    header = "| method | runs | model | " + " | ".join(_GROUP_NAMES[g] for g in groups) + " | training time (s) |"
    lines += [header, "|" + "---|" * 3 + "---:|" * (len(groups) + 1)]
    for name, m in record["methods"].items():
        s = m["summary"]
        n = s["wall_time_s"]["n"]
        if not m["runs"]:
            lines.append(f"| {_label(m, record)} | 0 | no finished run yet | " + " | ".join("" for _ in groups)
                         + " | |")
            continue
        k1 = all(r["splits"].get("test", {}).get("single") == r["splits"].get("test", {}).get("ensemble")
                 for r in m["runs"].values())
        for model in (("single",) if k1 else ("single", "ensemble")):
            cells = [_fmt(s.get(f"test/{model}/{g}")) for g in groups]
            t = s.get("train_time_s") or {}
            train_time = f"{t['mean']:.0f}" if t.get("mean") is not None and model == "single" else ""
            lines.append(f"| {_label(m, record)} | {n} | {model if not k1 else 'single (K = 1)'} | " + " | ".join(cells)
                         + f" | {train_time} |")
    return lines + [""]


def _render_differences(record: Dict[str, Any], groups: List[str]) -> List[str]:
    if not record.get("differences"):
        return []
    if record["baseline"] in record.get("series", {}):
        base = f"**{record['series'][record['baseline']]}** trained for as many epochs"
    else:
        base = f"**{record['methods'][record['baseline']]['label']}**"
    lines = [f"Paired differences to {base} (test top-1 points, same seeds; mean ± standard deviation, "
             "each seed's difference in brackets):", ""]
    lines += ["| method | model | " + " | ".join(_GROUP_NAMES[g] for g in groups) + " |",
              "|---|---|" + "---:|" * len(groups)]
    for name, d in record["differences"].items():
        for model in ("single", "ensemble"):
            cells = [_fmt(d["vs_baseline_single"].get(f"test/{model}/{g}"), signed=True) for g in groups]
            if any(c != "n/a" for c in cells):
                lines.append(f"| {_label(record['methods'][name], record)} | {model} | " + " | ".join(cells) + " |")
    return lines + [""]


def _render_validation(record: Dict[str, Any]) -> List[str]:
    lines = ["Validation top-1 (%) of the same selection (what the runs were selected on), and the selected epoch:",
             "", "| method | single | ensemble | best epoch (per seed) |", "|---|---:|---:|---|"]
    for name, m in record["methods"].items():
        s = m["summary"]
        if not m["runs"]:
            continue
        epochs = ", ".join(str(r["best_epoch"]) for r in m["runs"].values())
        lines.append(f"| {_label(m, record)} | {_fmt(s.get('val/single/top1'), False)} | "
                     f"{_fmt(s.get('val/ensemble/top1'), False)} | {epochs} |")
    return lines + [""]


def _render_schedule(record: Dict[str, Any], figure_dir: str) -> List[str]:
    """Per series (rows) and schedule length (columns): the paired test difference to the baseline series at that
    length, single and ensemble, and the validation top-1 the runs were selected on; then the figure."""
    if record.get("baseline") not in record.get("series", {}):
        return []
    epochs, grid = schedule_grid(record)
    base = record["baseline"]
    lines = ["### Schedule length", "",
             f"Test top-1 minus **{record['series'][base]}** trained for as many epochs (points, same seeds; mean ± "
             "standard deviation, each seed's difference in brackets) for the selected single expert and the "
             "ensemble, and validation top-1 (%, single / ensemble, mean ± standard deviation), per schedule length:",
             "", "| series | | " + " | ".join(f"{e} epochs" for e in epochs) + " |",
             "|---|---|" + "---:|" * len(epochs)]
    for series, at in grid.items():
        rows = [("validation", [_validation_cell(record["methods"][at[e]]) if e in at else "" for e in epochs])]
        if series != base:
            rows = [(f"test {model} minus baseline",
                     [_fmt(record["differences"][at[e]]["vs_baseline_single"].get(f"test/{model}/top1"), signed=True)
                      if e in at else "" for e in epochs]) for model in ("single", "ensemble")] + rows
        label = record["series"][series] + (" (baseline)" if series == base else "")
        for i, (what, cells) in enumerate(rows):
            lines.append(f"| {label if i == 0 else ''} | {what} | " + " | ".join(cells) + " |")
    link = f"{figure_dir}/{record['name']}_schedule.png"
    return lines + ["", f"![Paired test difference to {record['series'][base]} against schedule length]({link})", ""]


def _validation_cell(m: Dict[str, Any]) -> str:
    """Validation top-1, ``single / ensemble`` (the single alone where they are the same, K = 1)."""
    single, ensemble = m["summary"].get("val/single/top1"), m["summary"].get("val/ensemble/top1")
    if single == ensemble:
        return _fmt(single, False)
    return f"{_fmt(single, False)} / {_fmt(ensemble, False)}"


def fill_numbers(text: str, record: Dict[str, Any]) -> str:
    """Replace ``{{METHOD:KEY}}`` with the method's mean ± std of a summary key (``test/single/top1``), and
    ``{{diff:METHOD:KEY}}`` with its paired difference to the baseline: prose quotes numbers without typing them."""

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
            lines.append(f"| {_label(m, record)} | {model} | " + " | ".join(f"{row[c]:.1f}" for c in order)
                         + f" | {kl_text} |")
    return lines + [""]


def _render_curves(record: Dict[str, Any], points: int = 6) -> List[str]:
    """Mean validation top-1 (ensemble) and training loss at a few epochs: how the methods got there."""
    any_runs = [r for m in record["methods"].values() for r in m["runs"].values() if r["history"]]
    if not any_runs:
        return []
    lengths = {len(r["history"]) for r in any_runs}  # each schedule's last epoch is a column too
    epochs = max(lengths)
    marks = sorted({max(1, round(epochs * i / points)) for i in range(1, points + 1)} | {1} | lengths)
    lines = ["Training curves, mean over seeds: validation ensemble top-1 (%) / mean training loss per expert at "
             "the end of each epoch shown:", "",
             "| method | " + " | ".join(f"epoch {e}" for e in marks) + " |", "|---|" + "---:|" * len(marks)]
    for m in record["methods"].values():
        if not m["runs"]:
            continue
        cells = [_curve_cell(m["runs"].values(), e) for e in marks]
        lines.append(f"| {_label(m, record)} | " + " | ".join(cells) + " |")
    lines += ["", "The loss shown is the all-class Balanced Softmax cross-entropy per expert (NCL's `nil_all` / K, "
              "the baselines' loss / K): the same quantity for every method.", ""]
    return lines


def _curve_cell(runs, epoch: int) -> str:
    """``mean validation ensemble top-1 / mean training loss per expert`` over ``runs`` at the end of ``epoch``."""
    vals, losses = [], []
    for r in runs:
        h = next((x for x in r["history"] if x.get("epoch") == epoch), None)
        if h is None:
            continue
        if h.get("val_top1") is not None:
            vals.append(h["val_top1"])
        k = len(h.get("val_expert_top1") or [1])
        loss = h.get("train_nil_all", h.get("train_ce"))
        if loss is not None:
            losses.append(loss / k)
    return ((f"{sum(vals) / len(vals):.1f}" if vals else "-") + " / "
            + (f"{sum(losses) / len(losses):.3f}" if losses else "-"))


HEADER = """# Results

Generated by `python recipes/study.py --report` from the study records in `docs/results/*.json`, which
`python recipes/study.py --config STUDY.yaml` writes from its run folders. No number on this page is typed by
hand; to change it, rerun the study or edit the study file. Machine: {machine}.
"""


def render_markdown(records: Sequence[Dict[str, Any]], machine: str = "see each study",
                    figure_dir: str = "results") -> str:
    """The results page of ``records``; figures are linked from ``figure_dir`` (relative to the page)."""
    parts = [HEADER.format(machine=machine)]
    parts += [render_deployment(r) if r.get("kind") == "deployment" else render_study(r, figure_dir=figure_dir)
              for r in records]
    return "\n".join(parts).rstrip() + "\n"


def write_results(records_dir: Path, markdown_path: Path, *, order: Optional[Sequence[str]] = None) -> Path:
    """Regenerate ``markdown_path`` from every ``*.json`` record in ``records_dir`` (in ``order`` first), and the
    figure ``records_dir/<name>_schedule.png`` of every study with a series baseline."""
    records = [json.loads(p.read_text()) for p in sorted(Path(records_dir).glob("*.json"))]
    rank = {n: i for i, n in enumerate(order or [])}
    records.sort(key=lambda r: (rank.get(r["name"], len(rank)),
                                r["position"] if r.get("position") is not None else math.inf, r["name"]))
    machines = sorted({r.get("machine") for r in records if r.get("machine")})
    for r in records:
        if r.get("baseline") in r.get("series", {}):
            plot_schedule(r, Path(records_dir) / f"{r['name']}_schedule.png")
    figure_dir = Path(os.path.relpath(Path(records_dir).resolve(), Path(markdown_path).resolve().parent)).as_posix()
    markdown_path.write_text(render_markdown(records, machine="; ".join(machines) or "see each study",
                                             figure_dir=figure_dir))
    return markdown_path
