"""Long-tailed metrics of NCL models from their logits: the numbers the field reports.

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
  test imbalance r, the prior ``pi_r`` of :func:`ncl_hub.priors.long_tailed_prior` over the training order.
  Each record's ``prior`` says how the model predicts: ``raw`` as deployed (raw logits, or the caller's class
  prior); ``oracle`` with ``z + tau * log(pi_r)``, the test prior known (logit adjustment, ``adjusted``
  true); both exactly: top-1 = ``sum_c pi_r(c) * acc_c`` over the classes present in the split (``pi_r``
  renormalised over them), the accuracy on the split resampled to ``pi_r`` without resampling noise.
  ``estimated``: the test prior unknown and estimated from the test images themselves. For each r, ``draws``
  subsets of the split that follow ``pi_r`` are drawn (as large as the split allows, seeded); the prior is
  estimated by EM (:func:`ncl_hub.priors.estimate_prior`) on one half of each without its labels, and the other
  half is scored with ``z + tau * log(pi_hat)``; the record holds the mean and spread of that top-1, of the
  L1 error of ``pi_hat`` (``prior_l1``), and the raw and oracle top-1 of the same halves (paired).
  With a ``calibration`` (BCTS maps, :func:`ncl_hub.calibration.fit_model_calibration`) the oracle and
  estimated adjustments apply to the calibrated logits ``z / T + b``, and EM reads calibrated probabilities;
  the split then also reports ``calibration``: NLL and ECE of every model before and after.
* All returned numbers are Python ints / floats / None, so metrics dicts go to JSON as they are (an NLL is
  ``inf`` when a class prior of 0 rules out a label that occurs).

The "single expert" of a report is chosen on a validation split by the caller (or taken from the
split named "val"), never on the test split; ``best_expert`` of each split is informational only.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..data.columns import VALIDATION_SPLITS
from ..losses import validate_target
from ..priors import TEST_IMBALANCES, PriorSpec, logit_adjustment, resolve_prior
from . import shift

__all__ = ["GROUPS", "evaluate_predictions", "group_classes", "split_metrics"]

GROUPS = ("many", "medium", "few")


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
    calibration: Optional[Dict[str, Any]] = None,
    estimate_draws: int = 5,
    seed: int = 0,
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
        calibration: the model's BCTS maps (``NCLModel.calibration``), or None: see the module docstring.
        estimate_draws: subsets per test imbalance of the ``estimated`` records (0: none).
        seed: seeds those subsets.

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
    num_experts, num_samples, num_classes = _check_split(expert_logits, labels, class_counts, num_bins, hist_bins)
    counts = _as_counts(class_counts)
    labels = torch.as_tensor(labels).flatten().to(expert_logits.device)
    validate_target(labels, num_classes)
    groups = group_classes(counts, many_threshold, few_threshold)
    deployed = logit_adjustment(resolve_prior(class_prior, num_classes, counts.tolist()), prior_strength)

    stats = _sample_stats(expert_logits, labels, deployed)  # model index K is the ensemble
    labels = labels.cpu()
    ece_edges = _bin_edges(num_bins)
    models, per_class = _model_rows(stats, labels, groups, num_classes, ece_edges)
    expert_top1 = [row["top1"] for row in models[:num_experts]]
    maps = shift.calibration_maps(calibration, num_experts)
    shifted = dict(counts=counts, deployed=deployed, strength=prior_strength, imbalances=test_imbalances, maps=maps)
    out = {
        "num_samples": num_samples,
        "ensemble": models[num_experts],
        "experts": models[:num_experts],
        "best_expert": max(range(num_experts), key=lambda k: (expert_top1[k], -k)),
        "pairwise_kl": stats["pairwise_kl"].mean().item() if num_experts > 1 else 0.0,
        "hardest_negative_prob": _hardest_negative_histogram(stats["hardest_negative"], hist_bins),
        "reliability": _reliability(stats, labels, num_experts, ece_edges),
        "per_class_accuracy": {"ensemble": per_class[num_experts], "experts": per_class[:num_experts]},
        "prior_shift": shift.exact_prior_shift(expert_logits, labels, **shifted),
    }
    if estimate_draws and test_imbalances:
        shrinkage = float((calibration or {}).get("prior_shrinkage") or 0.0)
        out["prior_shift"] += shift.estimated_prior_shift(expert_logits, labels, **shifted, draws=estimate_draws,
                                                     seed=seed, shrinkage=shrinkage)
    if maps is not None:
        out["calibration"] = shift.calibration_rows(expert_logits, labels, maps, num_bins, calibration)
    return out


def _check_split(expert_logits: torch.Tensor, labels: torch.Tensor, class_counts: Any, num_bins: int,
                 hist_bins: int) -> Tuple[int, int, int]:
    """(K, N, C) of a split's logits [K, N, C], checked against the labels [N] and the class counts [C]."""
    if expert_logits.ndim != 3:
        raise ValueError(f"expert_logits must be [K, N, C], got shape {tuple(expert_logits.shape)}")
    num_experts, num_samples, num_classes = expert_logits.shape
    num_labels = torch.as_tensor(labels).numel()
    if num_labels != num_samples:
        raise ValueError(f"labels has {num_labels} entries but expert_logits have N={num_samples} samples")
    if num_samples == 0:
        raise ValueError("cannot evaluate an empty split (N = 0)")
    if num_experts == 0:
        raise ValueError("expert_logits has no experts (K = 0)")
    counts = _as_counts(class_counts)
    if counts.numel() != num_classes:
        raise ValueError(f"class_counts has {counts.numel()} entries but expert_logits have C={num_classes} classes")
    if num_bins < 1 or hist_bins < 1:
        raise ValueError(f"num_bins and hist_bins must be >= 1, got {num_bins} and {hist_bins}")
    return num_experts, num_samples, num_classes


def _model_rows(stats: Dict[str, torch.Tensor], labels: torch.Tensor, groups: Dict[str, List[int]],
                num_classes: int, ece_edges: torch.Tensor) -> Tuple[List[Dict[str, Any]], List[List[Any]]]:
    """Per model (the K experts, then the ensemble): the metrics row and the per-class accuracies [C]."""
    label_counts = torch.bincount(labels, minlength=num_classes).double()
    present = label_counts > 0
    models, per_class = [], []
    for pred, conf, nll in zip(stats["pred"], stats["conf"], stats["nll"]):
        correct = (pred == labels).double()
        class_acc = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct) / label_counts
        row = {"top1": 100.0 * correct.mean().item()}
        for name in GROUPS:
            idx = torch.tensor(groups[name], dtype=torch.long)
            idx = idx[present[idx]]
            row[name] = 100.0 * class_acc[idx].mean().item() if idx.numel() else None
        bins = _confidence_bins(conf, correct, ece_edges)
        row["ece"] = 100.0 * (bins["acc_sum"] - bins["conf_sum"]).abs().sum().item() / labels.numel()
        row["nll"] = nll.mean().item()
        models.append(row)
        per_class.append([100.0 * a if p else None for a, p in zip(class_acc.tolist(), present.tolist())])
    return models, per_class


def _reliability(stats: Dict[str, torch.Tensor], labels: torch.Tensor, num_experts: int,
                 ece_edges: torch.Tensor) -> Dict[str, Any]:
    """The ensemble's reliability diagram over the bins ``ece_edges`` [M + 1]."""
    correct = (stats["pred"][num_experts] == labels).double()
    bins = _confidence_bins(stats["conf"][num_experts], correct, ece_edges)
    nonempty = bins["count"] > 0
    mean_acc = (bins["acc_sum"] / bins["count"].clamp_min(1)).tolist()
    mean_conf = (bins["conf_sum"] / bins["count"].clamp_min(1)).tolist()
    return {
        "model": "ensemble",
        "bin_edges": ece_edges.tolist(),
        "counts": bins["count"].long().tolist(),
        "accuracy": [a if ok else None for a, ok in zip(mean_acc, nonempty.tolist())],
        "confidence": [c if ok else None for c, ok in zip(mean_conf, nonempty.tolist())],
    }


def _hardest_negative_histogram(hardest: torch.Tensor, hist_bins: int) -> Dict[str, Any]:
    """Mean, median and histogram over [0, 1] of the ensemble's hardest-negative probabilities [N]."""
    hist_edges = _bin_edges(hist_bins)
    # numpy.histogram convention: [lo, hi) with the last bin closed, so p = 1 is counted
    hist_idx = torch.bucketize(hardest, hist_edges[1:-1], right=True)
    return {
        "model": "ensemble",
        "mean": hardest.mean().item(),
        "median": _median(hardest),
        "bin_edges": hist_edges.tolist(),
        "counts": torch.bincount(hist_idx, minlength=hist_bins).tolist(),
    }


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
    calibration: Optional[Dict[str, Any]] = None,
    estimate_draws: int = 5,
) -> Dict[str, Any]:
    """:func:`split_metrics` for every split, plus the groups and the chosen single expert.

    Args:
        predictions: split name -> (expert logits [K, N, C], labels [N]), e.g. from :func:`predict`.
        class_counts: training images per class [C].
        many_threshold, few_threshold: see :func:`group_classes`.
        selected_expert: the single expert chosen on validation data by the caller. ``None``: the
            ``best_expert`` of the split named "val" (or else "validation") if there is one, otherwise
            no expert is selected. Never chosen on a test split.
        num_bins, hist_bins, class_prior, prior_strength, test_imbalances, calibration, estimate_draws: see
            :func:`split_metrics`.

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
            test_imbalances=test_imbalances, calibration=calibration, estimate_draws=estimate_draws,
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
        "calibration": calibration,
    }


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
    chunk = max(1, shift.CHUNK_ELEMENTS // max(1, (num_experts + 1) * num_classes))
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
