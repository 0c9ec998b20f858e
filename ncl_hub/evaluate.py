"""Long-tailed evaluation of NCL models: the numbers the field reports, a markdown summary and plots.

Shapes: K experts, N samples of a split, C classes, M calibration bins.

Conventions (every function below follows them):

* Logits are the models' raw logits. NCL is trained with Balanced Softmax, so at test time the
  prediction is ``argmax z`` and probabilities are ``softmax(z)`` of the raw logits; no prior is added,
  unless the caller deploys the model with a class prior (``class_prior``): then every metric is of
  ``z + tau * log(pi)``, as ``NCLModel.set_class_prior`` would predict (see :mod:`ncl_hub.priors`).
  Probabilities are computed in float64 log space (``log_softmax``).
* The ensemble's logits are the mean of the experts' logits (``logits.mean(0)``).
* ``top1`` is the share of correctly classified samples of the split. ``many`` / ``medium`` / ``few``
  are the mean, over the group's classes that have at least one sample in the split, of per-class
  accuracy (on the usual balanced test sets both readings agree). Groups follow the paper: many
  > 100 training images, few < 20, medium the rest, so 100 and 20 themselves are medium.
  A group with no classes, or none of whose classes occur in the split, gives ``None``.
* Accuracies and ``ece`` are in percent (0-100). ECE is the standard expected calibration error
  (Guo et al. 2017): confidence = max softmax probability, M equal-width bins ``(lo, hi]`` over
  [0, 1], ``sum_b n_b / N * |acc_b - conf_b|``. ``nll`` is the mean negative log-likelihood in nats.
  ``pairwise_kl`` is in nats.
* ``prior_shift`` (per split) is top-1 accuracy under shifted test class priors (SADE's protocol): for a
  test imbalance r, the prior ``pi_r`` of :func:`ncl_hub.priors.long_tailed_prior` over the training order,
  and top-1 = ``sum_c pi_r(c) * acc_c`` over the classes present in the split (``pi_r`` renormalised over
  them): exactly the accuracy on the split resampled to ``pi_r``, without resampling noise. ``adjusted``
  records predict with ``z + tau * log(pi_r)`` (the test prior known, logit adjustment); the others predict
  as deployed (raw logits, or the caller's class prior).
* All returned numbers are Python ints / floats / None, so metrics dicts go to JSON as they are (an NLL is
  ``inf`` when a class prior of 0 rules out a label that occurs).

The "single expert" of a report is chosen on a validation split by the caller (or taken from the
split named "val"), never on the test split; ``best_expert`` of each split is informational only.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .losses import validate_target
from .priors import (
    TEST_IMBALANCES, PriorSpec, describe_prior, format_imbalance, long_tailed_prior, logit_adjustment, resolve_prior,
)

__all__ = [
    "group_classes",
    "split_metrics",
    "evaluate_predictions",
    "predict",
    "format_summary",
    "format_prior_shift",
    "write_report",
    "load_metrics",
]

GROUPS = ("many", "medium", "few")
VALIDATION_SPLITS = ("val", "validation")
_CHUNK_ELEMENTS = 1 << 23  # float64 logits per chunk (64 MiB): bounds memory on iNaturalist-sized splits


def group_classes(
    class_counts: Union[torch.Tensor, Sequence[int]], many_threshold: int = 100, few_threshold: int = 20
) -> Dict[str, List[int]]:
    """Split classes by training frequency into many / medium / few shots.

    Args:
        class_counts: training images per class [C] (zeros allowed: such classes are "few").
        many_threshold: a class with strictly more training images is "many".
        few_threshold: a class with strictly fewer training images is "few"; the rest are "medium".
            The released NCL code's ``>= 100 / <= 20`` rule is ``many_threshold=99, few_threshold=21``.

    Returns:
        ``{"many": [...], "medium": [...], "few": [...]}``: sorted class ids.
    """
    counts = _as_counts(class_counts)
    if few_threshold > many_threshold:
        raise ValueError(f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})")
    many = counts > many_threshold
    few = counts < few_threshold
    medium = ~(many | few)
    return {name: torch.nonzero(mask).flatten().tolist() for name, mask in zip(GROUPS, (many, medium, few))}


@torch.no_grad()
def split_metrics(
    expert_logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: Union[torch.Tensor, Sequence[int]],
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    num_bins: int = 15,
    hist_bins: int = 20,
    class_prior: PriorSpec = None,
    prior_strength: float = 1.0,
    test_imbalances: Sequence[float] = TEST_IMBALANCES,
) -> Dict[str, Any]:
    """Every metric of one split, for the ensemble and each expert.

    Args:
        expert_logits: raw logits [K, N, C] (any float dtype, any device), without any class prior.
        labels: class indices [N].
        class_counts: training images per class [C]; defines the many / medium / few groups and the
            training order of the shifted test priors.
        many_threshold, few_threshold: see :func:`group_classes`.
        num_bins: M, equal-width confidence bins of the ECE and of the reliability diagram.
        hist_bins: equal-width bins over [0, 1] of the hardest-negative histogram.
        class_prior: the prior the model is deployed with (None, ``"uniform"``, ``"train"`` = the
            ``class_counts``, or C numbers): every metric except the ``adjusted`` prior-shift records is of
            ``z + prior_strength * log(pi)``.
        prior_strength: tau of that adjustment and of the ``adjusted`` prior-shift records.
        test_imbalances: the test imbalances r of ``prior_shift`` (empty: no prior-shift records).

    Returns:
        ``{"num_samples", "ensemble", "experts", "best_expert", "pairwise_kl", "hardest_negative_prob",
        "reliability", "per_class_accuracy"}``; ``ensemble`` and each of the K ``experts`` hold
        ``top1, many, medium, few, ece`` (percent) and ``nll`` (nats). ``hardest_negative_prob`` is the
        ensemble's per-sample ``max_{j != y} p_j`` (paper Fig. 5a) summarised by mean, median and a
        histogram (``bin_edges`` [hist_bins + 1], ``counts`` [hist_bins]). ``reliability`` is the
        ensemble's reliability diagram: ``bin_edges`` [M + 1], ``counts`` [M], ``accuracy`` and
        ``confidence`` [M] as fractions in [0, 1] (``None`` for empty bins). ``per_class_accuracy``
        holds C percentages per model, ``None`` for classes absent from the split. ``prior_shift``
        is a list of ``{"test_imbalance": r, "model": "ensemble" | "expert k", "adjusted": bool, "top1"}``
        (percent), for every r, model and both settings of ``adjusted``.
    """
    if expert_logits.ndim != 3:
        raise ValueError(f"expert_logits must be [K, N, C], got shape {tuple(expert_logits.shape)}")
    num_experts, num_samples, num_classes = expert_logits.shape
    labels = torch.as_tensor(labels).flatten()
    if labels.numel() != num_samples:
        raise ValueError(f"labels has {labels.numel()} entries but expert_logits have N={num_samples} samples")
    if num_samples == 0:
        raise ValueError("cannot evaluate an empty split (N = 0)")
    if num_experts == 0:
        raise ValueError("expert_logits has no experts (K = 0)")
    counts = _as_counts(class_counts)
    if counts.numel() != num_classes:
        raise ValueError(f"class_counts has {counts.numel()} entries but expert_logits have C={num_classes} classes")
    if num_bins < 1 or hist_bins < 1:
        raise ValueError(f"num_bins and hist_bins must be >= 1, got {num_bins} and {hist_bins}")
    labels = labels.to(expert_logits.device)
    validate_target(labels, num_classes)
    groups = group_classes(counts, many_threshold, few_threshold)
    deployed = logit_adjustment(resolve_prior(class_prior, num_classes, counts.tolist()), prior_strength)

    stats = _sample_stats(expert_logits, labels, deployed)  # model index K is the ensemble
    labels = labels.cpu()
    label_counts = torch.bincount(labels, minlength=num_classes).double()
    present = label_counts > 0
    ece_edges = _bin_edges(num_bins)

    models, per_class = [], []
    for m in range(num_experts + 1):
        correct = (stats["pred"][m] == labels).double()
        class_acc = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct) / label_counts
        row = {"top1": 100.0 * correct.mean().item()}
        for name in GROUPS:
            idx = torch.tensor(groups[name], dtype=torch.long)
            idx = idx[present[idx]]
            row[name] = 100.0 * class_acc[idx].mean().item() if idx.numel() else None
        bins = _confidence_bins(stats["conf"][m], correct, ece_edges)
        row["ece"] = 100.0 * (bins["acc_sum"] - bins["conf_sum"]).abs().sum().item() / num_samples
        row["nll"] = stats["nll"][m].mean().item()
        models.append(row)
        per_class.append([100.0 * a if p else None for a, p in zip(class_acc.tolist(), present.tolist())])

    ensemble_correct = (stats["pred"][num_experts] == labels).double()
    bins = _confidence_bins(stats["conf"][num_experts], ensemble_correct, ece_edges)
    nonempty = bins["count"] > 0
    mean_acc = (bins["acc_sum"] / bins["count"].clamp_min(1)).tolist()
    mean_conf = (bins["conf_sum"] / bins["count"].clamp_min(1)).tolist()
    hardest = stats["hardest_negative"]
    hist_edges = _bin_edges(hist_bins)
    # numpy.histogram convention: [lo, hi) with the last bin closed, so p = 1 is counted
    hist_idx = torch.bucketize(hardest, hist_edges[1:-1], right=True)
    expert_top1 = [row["top1"] for row in models[:num_experts]]
    return {
        "num_samples": num_samples,
        "ensemble": models[num_experts],
        "experts": models[:num_experts],
        "best_expert": max(range(num_experts), key=lambda k: (expert_top1[k], -k)),
        "pairwise_kl": stats["pairwise_kl"].mean().item() if num_experts > 1 else 0.0,
        "hardest_negative_prob": {
            "model": "ensemble",
            "mean": hardest.mean().item(),
            "median": _median(hardest),
            "bin_edges": hist_edges.tolist(),
            "counts": torch.bincount(hist_idx, minlength=hist_bins).tolist(),
        },
        "reliability": {
            "model": "ensemble",
            "bin_edges": ece_edges.tolist(),
            "counts": bins["count"].long().tolist(),
            "accuracy": [a if ok else None for a, ok in zip(mean_acc, nonempty.tolist())],
            "confidence": [c if ok else None for c, ok in zip(mean_conf, nonempty.tolist())],
        },
        "per_class_accuracy": {"ensemble": per_class[num_experts], "experts": per_class[:num_experts]},
        "prior_shift": _prior_shift(expert_logits, labels, counts, deployed, prior_strength, test_imbalances),
    }


def _prior_shift(expert_logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                 deployed: Optional[torch.Tensor], strength: float,
                 imbalances: Sequence[float]) -> List[Dict[str, Any]]:
    """Top-1 under shifted test priors (module docstring): per-class hits of every model, as deployed and
    adjusted to each test prior, weighted by that prior over the classes present in the split.

    ``labels`` [N] on the CPU; ``deployed``: the deployment adjustment [C] or None. Returns the records of
    :func:`split_metrics`'s ``prior_shift``, by imbalance, then model (ensemble first), then adjusted.
    """
    imbalances = [float(r) for r in imbalances]
    if not imbalances:
        return []
    num_experts, num_samples, num_classes = expert_logits.shape
    priors = torch.stack([long_tailed_prior(counts.tolist(), r) for r in imbalances])  # [R, C]
    zero = torch.zeros(num_classes, dtype=torch.float64)
    # row 0: as deployed; row 1 + i: adjusted to test prior i (no zero in these priors, so no -inf)
    shifts = torch.stack([zero if deployed is None else deployed]
                         + [_or(logit_adjustment(p, strength), zero) for p in priors])  # [1 + R, C]
    hits = torch.zeros(len(shifts), num_experts + 1, num_classes, dtype=torch.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, (num_experts + 1) * num_classes))
    for start in range(0, num_samples, chunk):
        z = expert_logits[:, start:start + chunk].double()
        z = torch.cat([z, z.mean(0, keepdim=True)]).cpu()  # [K + 1, n, C]
        y = labels[start:start + chunk]
        for row, shift in enumerate(shifts):
            correct = ((z + shift).argmax(-1) == y).double()  # [K + 1, n]
            hits[row].index_add_(1, y, correct)
    label_counts = torch.bincount(labels, minlength=num_classes).double()
    present = label_counts > 0
    accuracy = hits[:, :, present] / label_counts[present]  # [1 + R, K + 1, C_present]
    weights = priors[:, present] / priors[:, present].sum(-1, keepdim=True)  # renormalised over present classes
    names = ["ensemble"] + [f"expert {k}" for k in range(num_experts)]
    order = [num_experts] + list(range(num_experts))
    records = []
    for i, r in enumerate(imbalances):
        for name, m in zip(names, order):
            for adjusted, row in ((False, 0), (True, 1 + i)):
                top1 = 100.0 * (weights[i] * accuracy[row, m]).sum().item()
                records.append({"test_imbalance": r, "model": name, "adjusted": adjusted, "top1": top1})
    return records


def _or(value: Optional[torch.Tensor], default: torch.Tensor) -> torch.Tensor:
    return default if value is None else value


def evaluate_predictions(
    predictions: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    class_counts: Union[torch.Tensor, Sequence[int]],
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    selected_expert: Optional[int] = None,
    num_bins: int = 15,
    hist_bins: int = 20,
    class_prior: PriorSpec = None,
    prior_strength: float = 1.0,
    test_imbalances: Sequence[float] = TEST_IMBALANCES,
) -> Dict[str, Any]:
    """:func:`split_metrics` for every split, plus the groups and the chosen single expert.

    Args:
        predictions: split name -> (expert logits [K, N, C], labels [N]), e.g. from :func:`predict`.
        class_counts: training images per class [C].
        many_threshold, few_threshold: see :func:`group_classes`.
        selected_expert: the single expert chosen on validation data by the caller. ``None``: the
            ``best_expert`` of the split named "val" (or else "validation") if there is one, otherwise
            no expert is selected. Never chosen on a test split.
        num_bins, hist_bins, class_prior, prior_strength, test_imbalances: see :func:`split_metrics`.

    Returns:
        ``{"splits": {name: split_metrics}, "class_counts": [C], "groups": {"many_threshold",
        "few_threshold", "many", "medium", "few"}, "selected_expert": int or None, "class_prior": None |
        "train" | [C] (normalised), "prior_strength": tau, "test_imbalances": [R]}``.
    """
    if not predictions:
        raise ValueError("predictions is empty: pass at least one split name -> (expert_logits, labels)")
    counts = _as_counts(class_counts)
    resolved = resolve_prior(class_prior, counts.numel(), counts.tolist())  # checked once, before any split
    stored_prior = None if resolved is None else "train" if isinstance(class_prior, str) else resolved.tolist()
    splits = {
        name: split_metrics(
            logits, labels, counts, many_threshold=many_threshold, few_threshold=few_threshold,
            num_bins=num_bins, hist_bins=hist_bins, class_prior=resolved, prior_strength=prior_strength,
            test_imbalances=test_imbalances,
        )
        for name, (logits, labels) in predictions.items()
    }
    if selected_expert is None:
        val = next((name for name in VALIDATION_SPLITS if name in splits), None)
        if val is not None:
            selected_expert = splits[val]["best_expert"]
    else:
        selected_expert = int(selected_expert)
        for name, split in splits.items():
            if not 0 <= selected_expert < len(split["experts"]):
                raise ValueError(
                    f"selected_expert={selected_expert} is not an expert of split {name!r} "
                    f"(K={len(split['experts'])})"
                )
    return {
        "splits": splits,
        "class_counts": _counts_list(counts),
        "groups": {
            "many_threshold": many_threshold,
            "few_threshold": few_threshold,
            **group_classes(counts, many_threshold, few_threshold),
        },
        "selected_expert": selected_expert,
        "class_prior": stored_prior,
        "prior_strength": float(prior_strength),
        "test_imbalances": [float(r) for r in test_imbalances],
    }


@torch.no_grad()
def predict(model: nn.Module, dataloader: Any, accelerator: Any = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every expert's logits over a dataloader.

    Args:
        model: a module with ``forward_experts(x [B, 3, H, W]) -> [K, B, C]`` (e.g. NCLModel), possibly
            wrapped by ``accelerator.prepare``.
        dataloader: yields dicts with ``"pixel_values"`` [B, 3, H, W] and ``"label"`` [B].
        accelerator: an ``accelerate.Accelerator``; the model is unwrapped, run under
            ``accelerator.autocast()``, and batches are gathered with ``gather_for_metrics`` so that
            the samples padded onto the last batch of a distributed split are dropped.

    Returns:
        (expert logits [K, N, C] float32 on CPU, labels [N] int64 on CPU). The model is put in eval
        mode and every submodule's previous mode is restored afterwards. The logits are what the model
        returns: a model with a class prior (``NCLModel.set_class_prior``) returns adjusted ones, so to
        evaluate a prior, predict without it and pass it to :func:`evaluate_predictions`, which also needs
        the raw logits for the prior-shift records.
    """
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    modes = [(module, module.training) for module in model.modules()]
    if net is not model:
        modes += [(module, module.training) for module in net.modules()]
    device = accelerator.device if accelerator is not None else _module_device(net)
    model.train(False)
    net.train(False)
    all_logits: List[torch.Tensor] = []
    all_labels: List[torch.Tensor] = []
    try:
        for batch in dataloader:
            if "pixel_values" not in batch or "label" not in batch:
                raise KeyError(f"batches must be dicts with 'pixel_values' and 'label'; got keys {list(batch)}")
            x = batch["pixel_values"]
            y = torch.as_tensor(batch["label"])
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            ctx = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
            with ctx:
                logits = net.forward_experts(x)
            if logits.ndim != 3 or logits.shape[1] != x.shape[0]:
                raise ValueError(f"forward_experts must return [K, B, C] with B={x.shape[0]}, "
                                 f"got {tuple(logits.shape)}")
            # gather_for_metrics concatenates and de-duplicates along dim 0, so samples go first
            logits = logits.float().transpose(0, 1).contiguous()
            if accelerator is not None:
                logits, y = accelerator.gather_for_metrics((logits, y))
            all_logits.append(logits.cpu())
            all_labels.append(y.flatten().cpu())
    finally:
        for module, training in modes:
            module.training = training
    if not all_logits:
        raise ValueError("the dataloader yielded no batches")
    return torch.cat(all_logits).transpose(0, 1).contiguous(), torch.cat(all_labels).long()


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
    top1 = {(r["model"], r["adjusted"], r["test_imbalance"]): r["top1"] for r in records}
    models = ["ensemble"] + ([f"expert {expert}"] if expert is not None else [])
    as_is = "as deployed (with its class prior)" if deployed else "raw logits"
    lines = [
        f"Top-1 accuracy (%) when the test images follow a long-tailed class prior of test imbalance r over the "
        f"training order (r > 1: the head classes are r times as frequent as the tail; r < 1: the tail is the "
        f"head; 1: uniform), computed exactly by weighting per-class accuracies with the prior. Rows without "
        f"'adjusted' predict with the {as_is}; 'adjusted' rows with logits + tau log(pi) (tau = {prior_strength:g}), "
        f"the test prior pi known (logit adjustment).",
    ]
    num_classes = len(split["per_class_accuracy"]["ensemble"])
    absent = sum(a is None for a in split["per_class_accuracy"]["ensemble"])
    if absent:
        lines[0] += (f" {absent} of the {num_classes} classes have no image in this split: each prior is "
                     f"renormalised over the {num_classes - absent} present ones.")
    lines += ["", "| model | " + " | ".join(format_imbalance(r) for r in imbalances) + " |",
              "|---|" + "---:|" * len(imbalances)]
    for model in models:
        for adjusted in (False, True):
            if (model, adjusted, imbalances[0]) not in top1:
                continue
            label = model + (f" ({expert_note})" if expert_note and model != "ensemble" else "")
            label += ", adjusted" if adjusted else ""
            lines.append(f"| {label} | " + " | ".join(_fmt(top1[(model, adjusted, r)], 2) for r in imbalances)
                         + " |")
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
    with open(paths["metrics"], "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
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
    if path.is_dir():
        path = path / "metrics.json"
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- helpers
def _as_counts(class_counts: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0:
        raise ValueError("class_counts is empty")
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError("class_counts must be finite and non-negative")
    return counts


def _counts_list(counts: torch.Tensor) -> List[Union[int, float]]:
    return [int(c) if float(c).is_integer() else float(c) for c in counts.tolist()]


def _sample_stats(expert_logits: torch.Tensor, labels: torch.Tensor,
                  adjustment: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Per-sample quantities for the K experts and the ensemble (row K), in float64, on the CPU.

    ``adjustment``: a class-prior adjustment [C] added to every model's logits (ensemble: to the mean), or None.

    Returns ``pred``, ``conf`` (max softmax probability), ``nll`` as [K + 1, N]; the ensemble's
    ``hardest_negative`` (max_{j != y} p_j) [N] and ``pairwise_kl`` [N] = mean over ordered pairs
    k != q of KL(p_k || p_q). Processed in chunks of samples to bound float64 memory.
    """
    num_experts, num_samples, num_classes = expert_logits.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, (num_experts + 1) * num_classes))
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in ("pred", "conf", "nll", "hardest_negative", "pairwise_kl")}
    for start in range(0, num_samples, chunk):
        z = expert_logits[:, start:start + chunk].double()
        y = labels[start:start + chunk]
        z = torch.cat([z, z.mean(0, keepdim=True)])  # [K + 1, n, C]
        if adjustment is not None:
            z = z + adjustment.to(z.device)
        logp = z.log_softmax(-1)
        # argmax of the logits themselves: subtracting logsumexp can round distinct logits into a tie
        parts["pred"].append(z.argmax(-1).cpu())
        parts["conf"].append(logp.max(-1).values.exp().cpu())
        idx = y.view(1, -1, 1).expand(num_experts + 1, -1, 1)
        parts["nll"].append(-logp.gather(-1, idx).squeeze(-1).cpu())
        is_target = torch.zeros_like(logp[-1], dtype=torch.bool).scatter_(1, y.view(-1, 1), True)
        # C = 1 has no negative: -inf -> probability 0
        parts["hardest_negative"].append(logp[-1].masked_fill(is_target, float("-inf")).max(-1).values.exp().cpu())
        if num_experts > 1:
            # sum_{k != q} KL(p_k || p_q) = sum_k sum_c p_k (K log p_k - sum_q log p_q): O(K), not O(K^2)
            lp = logp[:num_experts]
            p = lp.exp()
            terms = torch.where(p > 0, p * (num_experts * lp - lp.sum(0, keepdim=True)), torch.zeros_like(p))
            kl = terms.sum(-1).sum(0) / (num_experts * (num_experts - 1))
        else:
            kl = torch.zeros(y.numel(), dtype=torch.float64, device=z.device)
        parts["pairwise_kl"].append(kl.cpu())
    cat_dim = {"pred": 1, "conf": 1, "nll": 1, "hardest_negative": 0, "pairwise_kl": 0}
    return {k: torch.cat(v, dim=cat_dim[k]) for k, v in parts.items()}


def _bin_edges(num_bins: int) -> torch.Tensor:
    # k / M rounded once (not accumulated as in linspace), so 0.6 is exactly float(0.6)
    return torch.arange(num_bins + 1, dtype=torch.float64) / num_bins


def _confidence_bins(conf: torch.Tensor, correct: torch.Tensor, edges: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-bin sample count, sum of correctness and sum of confidence; bins are (lo, hi] (Guo et al.)."""
    num_bins = edges.numel() - 1
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    zeros = torch.zeros(num_bins, dtype=torch.float64)
    return {
        "count": torch.bincount(idx, minlength=num_bins).double(),
        "acc_sum": zeros.clone().index_add_(0, idx, correct),
        "conf_sum": zeros.clone().index_add_(0, idx, conf),
    }


def _median(values: torch.Tensor) -> float:
    """The usual median (mean of the two middle values for even N), unlike torch.median's lower one."""
    ordered = values.sort().values
    n = ordered.numel()
    return ordered[n // 2].item() if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2]).item()


def _module_device(module: nn.Module) -> Optional[torch.device]:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else None


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
    top1 = {(r["model"], r["adjusted"], r["test_imbalance"]): r["top1"] for r in records}
    ax = fig.add_subplot(1, 1, 1)
    for model, label, color in (("ensemble", "ensemble", "tab:blue"), (f"expert {expert}", expert_label, "tab:orange")):
        for adjusted in (False, True):
            if (model, adjusted, imbalances[0]) in top1:
                suffix = ", adjusted to the test prior" if adjusted else (
                    ", with its class prior" if metrics.get("class_prior") is not None else "")
                ax.plot(imbalances, [top1[(model, adjusted, r)] for r in imbalances], "-" if adjusted else "--",
                        marker="o", ms=3, color=color, label=label + suffix)
    ax.set_xscale("log")
    ax.set_xticks(imbalances)
    ax.set_xticklabels([format_imbalance(r) for r in imbalances])
    ax.minorticks_off()
    ax.invert_xaxis()  # forward long tail on the left, backward on the right
    ax.set_xlabel("test imbalance r (forward long tail  <-  uniform  ->  backward long tail)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Accuracy under shifted test priors on {split_name}")
    ax.legend(fontsize=8)
