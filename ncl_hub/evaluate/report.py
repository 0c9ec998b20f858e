"""Reports of :func:`ncl_hub.evaluate.evaluate_predictions` output: a markdown summary, the shifted-prior table
(also shown in model cards), ``metrics.json`` and plots (matplotlib, optional: ``pip install ncl-hub[plots]``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .. import files
from ..data import classes_without_images, name_list
from ..priors import describe_prior, format_imbalance
from .metrics import GROUPS

__all__ = ["format_calibration", "format_prior_shift", "format_summary", "load_metrics", "prior_kind",
           "write_report"]

PRIOR_ROWS = (("raw", ""), ("oracle", ", adjusted"), ("estimated", ", estimated prior"))


def prior_kind(record: Dict[str, Any]) -> str:
    """``raw``, ``oracle`` or ``estimated``: how a ``prior_shift`` record predicts (records written before the
    estimated rows have only ``adjusted``)."""
    return record.get("prior") or ("oracle" if record.get("adjusted") else "raw")


def format_summary(metrics: Dict[str, Any], title: Optional[str] = None) -> str:
    """A markdown report of :func:`evaluate_predictions` output: one table per split.

    Rows: "ensemble" and "expert k" (the selected expert marked), columns overall / many / medium /
    few / ECE (percent) and NLL (nats); under each table the number of classes of each group that
    occur in the split, the mean pairwise KL and the split's best expert; then the shifted-prior table
    (:func:`format_prior_shift`) when the split has one.
    """
    groups = metrics["groups"]
    many_t, few_t = groups["many_threshold"], groups["few_threshold"]
    selected = metrics.get("selected_expert")
    lines = [f"# {title or 'NCL evaluation'}", ""]
    lines.append(
        f"Top-1 accuracy in %. many / medium / few: mean per-class accuracy over the group's classes present "
        f"in the split; groups by training images: many > {many_t}, medium {few_t}-{many_t}, few < {few_t}. "
        f"ECE in % over equal-width confidence bins; NLL in nats; probabilities are the softmax of raw logits; "
        f"the ensemble averages the experts' logits."
    )
    lines.append("")
    lines.append(
        f"Classes: {len(metrics['class_counts'])} in all; many {len(groups['many'])}, "
        f"medium {len(groups['medium'])}, few {len(groups['few'])}."
    )
    lines.append(
        f"Selected single expert (chosen on validation data): {selected}." if selected is not None
        else "Selected single expert: none (no validation split)."
    )
    deployed = describe_prior(metrics.get("class_prior"), metrics.get("prior_strength"))
    if deployed:
        lines += ["", f"Class prior: {deployed}. Every number is of the logits adjusted to it (logits + tau log pi), "
                      f"except the 'adjusted' rows of the shifted-prior tables, which use the test prior instead."]
    for name, split in metrics["splits"].items():
        num_bins = len(split["reliability"]["counts"])
        lines += ["", f"## {name}", "", f"{split['num_samples']} samples; ECE with {num_bins} bins.", ""]
        lines.append("| model | overall | many | medium | few | ECE | NLL |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        rows = [("ensemble", split["ensemble"])]
        rows += [(f"expert {k}" + (" (selected)" if k == selected else ""), row)
                 for k, row in enumerate(split["experts"])]
        for label, row in rows:
            cells = [_fmt(row[key], 2) for key in ("top1", *GROUPS, "ece")] + [_fmt(row["nll"], 4)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        in_split = _classes_in_split(split, groups)
        lines += [
            "",
            "Classes in this split: " + ", ".join(
                f"{g} {in_split[g]}/{len(groups[g])}" for g in GROUPS) + ".",
            f"Mean pairwise KL between experts: {split['pairwise_kl']:.4f} nats.",
            f"Best expert on this split (informational): {split['best_expert']}.",
        ]
        hn = split["hardest_negative_prob"]
        lines.append(f"Hardest negative probability of the ensemble: mean {hn['mean']:.4f}, "
                     f"median {hn['median']:.4f}.")
        calibration = format_calibration(split, name, selected)
        if calibration:
            lines += ["", f"### {name}: calibration", "", calibration.rstrip("\n")]
        expert = selected if selected is not None else split["best_expert"]
        table = format_prior_shift(split, expert, metrics.get("prior_strength", 1.0), deployed=deployed is not None,
                                   expert_note="selected" if selected is not None else "best here, informational")
        if table:
            lines += ["", f"### {name}: shifted test priors", "", table.rstrip("\n")]
    return "\n".join(lines) + "\n"


def format_prior_shift(split: Dict[str, Any], expert: Optional[int] = None, prior_strength: float = 1.0, *,
                       deployed: bool = False, expert_note: str = "") -> str:
    """A markdown table of a split's ``prior_shift`` records, and a paragraph that says how to read it.

    Rows: the ensemble and expert ``expert`` (if given), each as predicted and adjusted to the test prior;
    columns: the test imbalances (50 ... 1 ... 1/50). Returns "" when the split has no records (a
    ``metrics.json`` from before the prior-shift evaluation).

    Args:
        split: one split of :func:`evaluate_predictions` output.
        expert: the single expert to show (the selected one).
        expert_note: shown after the expert's name, e.g. "selected".
        prior_strength: tau of the adjusted rows (for the text).
        deployed: the unadjusted rows are of a model deployed with a class prior (for the text).
    """
    records = split.get("prior_shift") or []
    if not records:
        return ""
    imbalances = list(dict.fromkeys(r["test_imbalance"] for r in records))
    by_key = {(r["model"], prior_kind(r), r["test_imbalance"]): r for r in records}
    models = ["ensemble"] + ([f"expert {expert}"] if expert is not None else [])
    as_is = "as deployed (with its class prior)" if deployed else "raw logits"
    calibrated = " (calibrated first: z / T + b)" if split.get("calibration") else ""
    lines = [
        f"Top-1 accuracy (%) when the test images follow a long-tailed class prior of test imbalance r over the "
        f"training order (r > 1: the head classes are r times as frequent as the tail; r < 1: the tail is the "
        f"head; 1: uniform), computed exactly by weighting per-class accuracies with the prior. Rows without "
        f"'adjusted' predict with the {as_is}; 'adjusted' rows with logits{calibrated} + tau log(pi) "
        f"(tau = {prior_strength:g}), the test prior pi known (logit adjustment).",
    ]
    estimated = [r for r in records if prior_kind(r) == "estimated"]
    if estimated:
        e = estimated[0]
        lines[0] += (f" 'estimated prior' rows do not know it: for each r, {e['draws']} subsets of the split that "
                     f"follow it are drawn (as large as the split allows); the prior is estimated by EM from one half "
                     f"of each without labels (shrinkage {e.get('shrinkage', 0):g}) and the other half is scored with "
                     f"logits{calibrated} + tau log(estimate): the mean over the subsets (its spread, the L1 error of "
                     f"the estimate and the raw and oracle accuracy of the same halves are in metrics.json).")
    num_classes = len(split["per_class_accuracy"]["ensemble"])
    absent = sum(a is None for a in split["per_class_accuracy"]["ensemble"])
    if absent:
        lines[0] += (f" {absent} of the {num_classes} classes have no image in this split: each prior is "
                     f"renormalised over the {num_classes - absent} present ones.")
    lines += ["", "| model | " + " | ".join(format_imbalance(r) for r in imbalances) + " |",
              "|---|" + "---:|" * len(imbalances)]
    for model in models:
        for kind, suffix in PRIOR_ROWS:
            if not any((model, kind, r) in by_key for r in imbalances):
                continue
            label = model + (f" ({expert_note})" if expert_note and model != "ensemble" else "") + suffix
            cells = [_fmt(by_key[(model, kind, r)]["top1"], 2) if (model, kind, r) in by_key else "n/a"
                     for r in imbalances]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for model in models if estimated else ():
        cells = [_fmt(by_key[(model, "estimated", r)]["prior_l1"], 3) if (model, "estimated", r) in by_key else "n/a"
                 for r in imbalances]
        lines.append(f"| {model}: L1 error of the estimated prior | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_calibration(split: Dict[str, Any], name: str, selected: Optional[int] = None) -> str:
    """A markdown table of a split's ``calibration`` record: NLL (nats) and ECE (%) of every model before and
    after its calibration map, and where the maps were fitted. "" when the split has none."""
    record = split.get("calibration")
    if not record:
        return ""
    fit = record.get("fit_split")
    where = (f"fitted on the {fit} split ({record.get('fitted_on')} images)" if fit else "fitted earlier")
    note = " This is that split: the numbers after are in-sample." if fit == name else ""
    lines = [f"Calibration maps {where}, each model's method (none; temperature: logits / T; bcts: logits / T + b, a "
             f"bias per class) chosen with the prior-estimation shrinkage for the best estimates out of fold.{note}",
             "",
             "| model | method | T | NLL | NLL calibrated | ECE | ECE calibrated |",
             "|---|---|---:|---:|---:|---:|---:|"]
    rows = [("ensemble", record["ensemble"])] + [
        (f"expert {k}" + (" (selected)" if k == selected else ""), row) for k, row in enumerate(record["experts"])]
    for label, row in rows:
        lines.append(f"| {label} | {row.get('method') or 'bcts'} | {_fmt(row['temperature'], 3)} | "
                     f"{_fmt(row['nll'], 4)} | "
                     f"{_fmt(row['nll_calibrated'], 4)} | {_fmt(row['ece'], 2)} | {_fmt(row['ece_calibrated'], 2)} |")
    return "\n".join(lines) + "\n"


def write_report(
    metrics: Dict[str, Any], out_dir: Union[str, Path], *, title: Optional[str] = None, plots: bool = True
) -> Dict[str, Path]:
    """Write ``metrics.json``, ``summary.md`` and (``plots``) the PNGs of the "test" split (else the first).

    The PNGs: ``per_class_accuracy.png`` (per-class accuracy of the ensemble and of the selected
    expert, or the plotted split's best one when none is selected, against classes sorted by training
    count, counts on a log-scale twin axis), ``reliability.png`` (ensemble), ``hardest_negative.png`` and,
    when the split has prior-shift records, ``prior_shift.png`` (top-1 against test imbalance, log axis).

    Returns:
        name -> path written: ``metrics``, ``summary`` and, with plots, ``per_class_accuracy``,
        ``reliability``, ``hardest_negative`` and ``prior_shift``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "summary": out / "summary.md"}
    if plots:
        figure_cls = _matplotlib_figure()  # fail before writing anything
    files.atomic_write(paths["metrics"], json.dumps(metrics, indent=2) + "\n")
    paths["summary"].write_text(format_summary(metrics, title))
    if plots:
        split_name = "test" if "test" in metrics["splits"] else next(iter(metrics["splits"]))
        split = metrics["splits"][split_name]
        draws = [("per_class_accuracy", _plot_per_class), ("reliability", _plot_reliability),
                 ("hardest_negative", _plot_hardest_negative)]
        if split.get("prior_shift"):
            draws.append(("prior_shift", _plot_prior_shift))
        for key, draw in draws:
            fig = figure_cls(figsize=(7, 4.5), dpi=100)
            draw(fig, metrics, split_name, split)
            fig.tight_layout()
            paths[key] = out / f"{key}.png"
            fig.savefig(paths[key])
    return paths


def load_metrics(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a ``metrics.json`` written by :func:`write_report` (a directory means its ``metrics.json``)."""
    path = Path(path)
    return files.read_json(path / "metrics.json" if path.is_dir() else path)


def _fmt(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _classes_in_split(split: Dict[str, Any], groups: Dict[str, Any]) -> Dict[str, int]:
    acc = split["per_class_accuracy"]["ensemble"]
    return {g: sum(acc[c] is not None for c in groups[g]) for g in GROUPS}


def _matplotlib_figure() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("write_report(plots=True) needs matplotlib: pip install ncl-hub[plots]") from err

    # a Figure bound to an Agg canvas: no pyplot, so the caller's global backend is left alone
    def make(**kwargs: Any) -> Any:
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)
        return fig

    return make


def _single_expert(metrics: Dict[str, Any], split_name: str, split: Dict[str, Any]) -> Tuple[int, str]:
    selected = metrics.get("selected_expert")
    if selected is not None:
        return selected, f"expert {selected} (selected on validation)"
    best = split["best_expert"]
    return best, f"expert {best} (best on {split_name}, informational)"


def _plot_per_class(fig: Any, metrics: Dict[str, Any], split_name: str, split: Dict[str, Any]) -> None:
    counts = metrics["class_counts"]
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))  # head to tail
    ranks = list(range(len(order)))
    expert, expert_label = _single_expert(metrics, split_name, split)
    per_class = split["per_class_accuracy"]

    def series(values: List[Optional[float]]) -> List[float]:
        return [math.nan if values[c] is None else values[c] for c in order]

    ax = fig.add_subplot(1, 1, 1)
    twin = ax.twinx()
    twin.fill_between(ranks, [counts[c] if counts[c] > 0 else math.nan for c in order], step="mid",
                      color="0.85", label="training images")
    twin.set_yscale("log")
    twin.set_ylabel("training images (log scale)")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    marker = "o" if len(order) <= 200 else "."
    ax.plot(ranks, series(per_class["ensemble"]), marker, ms=3, alpha=0.8, label="ensemble")
    ax.plot(ranks, series(per_class["experts"][expert]), marker, ms=3, alpha=0.8, label=expert_label)
    groups = metrics["groups"]
    for boundary in (len(groups["many"]) - 0.5, len(groups["many"]) + len(groups["medium"]) - 0.5):
        if 0 < boundary < len(order) - 1:
            ax.axvline(boundary, color="0.4", ls="--", lw=0.8)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("class, sorted by training images (many | medium | few)")
    ax.set_ylabel("per-class top-1 accuracy (%)")
    ax.set_title(f"Per-class accuracy on {split_name}")
    handles, labels = ax.get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    ax.legend(handles + twin_handles, labels + twin_labels, loc="lower left", fontsize=8)


def _plot_reliability(fig: Any, metrics: Dict[str, Any], split_name: str, split: Dict[str, Any]) -> None:
    rel = split["reliability"]
    edges = rel["bin_edges"]
    width = edges[1] - edges[0]
    lefts = [edges[i] for i, a in enumerate(rel["accuracy"]) if a is not None]
    acc = [a for a in rel["accuracy"] if a is not None]
    conf = [c for c in rel["confidence"] if c is not None]
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(lefts, acc, width=width, align="edge", edgecolor="black", label="accuracy")
    # hatched outline from accuracy to mean confidence, so the accuracy bar stays readable either way
    ax.bar(lefts, [abs(c - a) for a, c in zip(acc, conf)], bottom=[min(a, c) for a, c in zip(acc, conf)],
           width=width, align="edge", facecolor="none", edgecolor="tab:red", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability of the ensemble on {split_name} (ECE {split['ensemble']['ece']:.2f}%)")
    ax.legend(loc="upper left", fontsize=8)


def _plot_hardest_negative(fig: Any, metrics: Dict[str, Any], split_name: str, split: Dict[str, Any]) -> None:
    hn = split["hardest_negative_prob"]
    edges = hn["bin_edges"]
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(edges[:-1], hn["counts"], width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge",
           edgecolor="black")
    ax.axvline(hn["mean"], color="tab:red", ls="--", label=f"mean {hn['mean']:.3f}")
    ax.axvline(hn["median"], color="tab:green", ls=":", label=f"median {hn['median']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the hardest negative class, max_{j != y} p_j")
    ax.set_ylabel("samples")
    ax.set_title(f"Hardest negative of the ensemble on {split_name}")
    ax.legend(fontsize=8)


def _plot_prior_shift(fig: Any, metrics: Dict[str, Any], split_name: str, split: Dict[str, Any]) -> None:
    records = split["prior_shift"]
    imbalances = list(dict.fromkeys(r["test_imbalance"] for r in records))
    expert, expert_label = _single_expert(metrics, split_name, split)
    top1 = {(r["model"], prior_kind(r), r["test_imbalance"]): r["top1"] for r in records}
    styles = {"raw": ("--", ", with its class prior" if metrics.get("class_prior") is not None else ""),
              "oracle": ("-", ", adjusted to the test prior (known)"), "estimated": (":", ", prior estimated")}
    ax = fig.add_subplot(1, 1, 1)
    for model, label, color in (("ensemble", "ensemble", "tab:blue"), (f"expert {expert}", expert_label, "tab:orange")):
        for kind, (style, suffix) in styles.items():
            xs = [r for r in imbalances if (model, kind, r) in top1]
            if xs:
                ax.plot(xs, [top1[(model, kind, r)] for r in xs], style, marker="o", ms=3, color=color,
                        label=label + suffix)
    ax.set_xscale("log")
    ax.set_xticks(imbalances)
    ax.set_xticklabels([format_imbalance(r) for r in imbalances])
    ax.minorticks_off()
    ax.invert_xaxis()  # forward long tail on the left, backward on the right
    ax.set_xlabel("test imbalance r (forward long tail  <-  uniform  ->  backward long tail)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Accuracy under shifted test priors on {split_name}")
    ax.legend(fontsize=8)


def record_absent_classes(metrics: Dict[str, Any], split_sets: Dict[str, Any], names: List[str]) -> List[str]:
    """Write ``classes_without_images`` (class names) into every evaluated split of ``metrics``; returns the lines
    that report them."""
    lines = []
    for split, entry in metrics.get("splits", {}).items():
        if split_sets.get(split) is None:
            continue
        absent = classes_without_images(split_sets[split], names)
        entry["classes_without_images"] = absent
        if absent:
            lines.append(f"{split}: {len(absent)} of {len(names)} classes have no {split} images, so no accuracy: "
                         f"{name_list(absent)}")
    return lines
