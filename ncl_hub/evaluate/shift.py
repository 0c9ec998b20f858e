"""What happens to a model's accuracy when the class mix of its deployment shifts: top-1 under shifted test priors,
as deployed (``raw``), with the test prior known (``oracle``) and with the test prior estimated from the test images
(``estimated``), and the calibration of every model on the split. :func:`ncl_hub.evaluate.split_metrics` calls these;
the conventions are in :mod:`ncl_hub.evaluate.metrics`.

Shapes: K experts, N samples of a split, C classes; index K of a stacked [K + 1, ...] tensor is the ensemble.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import calibration as calib
from ..calibration import Calibration
from ..priors import estimate_prior, long_tailed_prior, logit_adjustment
from ..seeding import derive_seed

__all__ = ["CHUNK_ELEMENTS", "calibration_maps", "calibration_rows", "estimated_prior_shift", "exact_prior_shift"]

CHUNK_ELEMENTS = 1 << 23  # float64 logits per chunk (64 MiB): bounds memory on iNaturalist-sized splits


def exact_prior_shift(expert_logits: torch.Tensor, labels: torch.Tensor, *, counts: torch.Tensor,
                 deployed: Optional[torch.Tensor], strength: float, imbalances: Sequence[float],
                 maps: Optional[List[Calibration]]) -> List[Dict[str, Any]]:
    """Top-1 under shifted test priors (module docstring): per-class hits of every model, as deployed (``raw``)
    and adjusted to each test prior (``oracle``; calibrated first when ``maps`` are given), weighted by that
    prior over the classes present in the split.

    ``labels`` [N] on the CPU; ``deployed``: the deployment adjustment [C] or None. Returns the records of
    :func:`split_metrics`'s ``prior_shift``, by imbalance, then model (ensemble first), then raw / oracle.
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
    chunk = max(1, CHUNK_ELEMENTS // max(1, (num_experts + 1) * num_classes))
    for start in range(0, num_samples, chunk):
        z = expert_logits[:, start:start + chunk].double()
        z = torch.cat([z, z.mean(0, keepdim=True)]).cpu()  # [K + 1, n, C]
        calibrated = _apply_maps(z, maps)
        y = labels[start:start + chunk]
        for row, shift in enumerate(shifts):
            correct = (((z if row == 0 else calibrated) + shift).argmax(-1) == y).double()  # [K + 1, n]
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
                records.append({"test_imbalance": r, "model": name, "prior": "oracle" if adjusted else "raw",
                                "adjusted": adjusted, "top1": top1})
    return records


def calibration_maps(calibration: Optional[Dict[str, Any]], num_experts: int) -> Optional[List[Calibration]]:
    """The maps of the K experts and the ensemble (index K), from ``NCLModel.calibration``; an expert without a
    map of its own gets the identity."""
    if not calibration:
        return None
    ensemble = Calibration.from_dict(calibration["ensemble"])
    experts = calibration.get("experts") or [None] * num_experts
    if len(experts) != num_experts:
        raise ValueError(f"calibration has {len(experts)} expert maps for {num_experts} experts")
    return [Calibration.from_dict(e) if e else Calibration.identity(ensemble.num_classes) for e in experts] + [
        ensemble]


def _apply_maps(z: torch.Tensor, maps: Optional[List[Calibration]]) -> torch.Tensor:
    """Logits [K + 1, n, C] (experts, then the ensemble) each through its calibration map (float64)."""
    if maps is None:
        return z
    return torch.stack([m.apply(z[k]) for k, m in enumerate(maps)])


def calibration_rows(expert_logits: torch.Tensor, labels: torch.Tensor, maps: List[Calibration], num_bins: int,
                      calibration: Dict[str, Any]) -> Dict[str, Any]:
    """NLL (nats) and ECE (%) of every model on this split before and after its calibration map (raw logits, no
    class prior), and where the maps were fitted."""
    z = expert_logits.double().cpu()
    z = torch.cat([z, z.mean(0, keepdim=True)])
    present = torch.bincount(labels, minlength=z.shape[-1]) > 0
    rows = []
    for k, m in enumerate(maps):
        after = m.apply(z[k])
        rows.append({"nll": calib.nll(z[k], labels), "nll_calibrated": calib.nll(after, labels),
                     "ece": 100 * calib.expected_calibration_error(z[k], labels, num_bins),
                     "ece_calibrated": 100 * calib.expected_calibration_error(after, labels, num_bins),
                     "temperature": m.temperature, "method": m.method,
                     "prior_shrinkage": m.prior_shrinkage})
    return {"fit_split": calibration.get("fit_split"), "fitted_on": calibration.get("num_samples"),
            "classes_present": int(present.sum()), "ensemble": rows[-1], "experts": rows[:-1]}


def _subset_sizes(label_counts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Images per class [C] of the largest subset whose classes follow ``target`` (over the present classes)."""
    present = label_counts > 0
    total = torch.min(label_counts[present] / target[present])
    return torch.floor(total * target).long().clamp(min=0) * present


def estimated_prior_shift(expert_logits: torch.Tensor, labels: torch.Tensor, *, counts: torch.Tensor,
                           deployed: Optional[torch.Tensor], strength: float, imbalances: Sequence[float],
                           maps: Optional[List[Calibration]], draws: int, seed: int,
                           shrinkage: float) -> List[Dict[str, Any]]:
    """The ``estimated`` records (module docstring): per test imbalance and model, EM on one half of each of
    ``draws`` subsets that follow the test prior, the other half scored raw, oracle and with the estimate."""
    num_experts, _, num_classes = expert_logits.shape
    z = expert_logits.double().cpu()
    z = torch.cat([z, z.mean(0, keepdim=True)])  # [K + 1, N, C]
    calibrated = _apply_maps(z, maps)
    raw = z if deployed is None else z + deployed
    label_counts = torch.bincount(labels, minlength=num_classes)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    names = ["ensemble"] + [f"expert {k}" for k in range(num_experts)]
    order = [num_experts] + list(range(num_experts))
    records = []
    for i, r in enumerate(float(r) for r in imbalances):
        target = long_tailed_prior(counts.tolist(), r) * (label_counts > 0)
        target = target / target.sum()
        sizes = _subset_sizes(label_counts, target)
        if int(sizes.sum()) < 2:  # too few images to split into an estimation half and a scored half
            continue
        oracle = _shift(target, strength)
        results = {m: [] for m in order}
        for d in range(draws):
            g = torch.Generator().manual_seed(derive_seed(seed, i, d))
            chosen = torch.cat([idx[torch.randperm(len(idx), generator=g)[:n]] for idx, n in zip(by_class, sizes)])
            chosen = chosen[torch.randperm(len(chosen), generator=g)]
            half_a, half_b = chosen[: len(chosen) // 2], chosen[len(chosen) // 2:]
            for m in order:
                kappa = shrinkage if maps is None or maps[m].prior_shrinkage is None else maps[m].prior_shrinkage
                estimate = estimate_prior(calibrated[m, half_a], shrinkage=kappa).prior
                scored = calibrated[m, half_b]
                y = labels[half_b]
                results[m].append([
                    _top1(raw[m, half_b], y), _top1(scored + oracle, y),
                    _top1(scored + _shift(estimate, strength), y),
                    (estimate - target).abs().sum().item()])
        for name, m in zip(names, order):
            t = torch.tensor(results[m], dtype=torch.float64)  # [draws, 4]: raw, oracle, estimated, L1
            std = t.std(0) if draws > 1 else torch.zeros(4, dtype=torch.float64)
            records.append({"test_imbalance": r, "model": name, "prior": "estimated", "adjusted": True,
                            "top1": t[:, 2].mean().item(), "top1_std": std[2].item(),
                            "raw_top1": t[:, 0].mean().item(), "oracle_top1": t[:, 1].mean().item(),
                            "prior_l1": t[:, 3].mean().item(), "prior_l1_std": std[3].item(), "draws": draws,
                            "estimated_from": len(half_a), "num_samples": len(half_b),
                            "shrinkage": shrinkage if maps is None or maps[m].prior_shrinkage is None
                            else maps[m].prior_shrinkage})
    return records


def _shift(prior: torch.Tensor, strength: float) -> Any:
    """``tau * log(pi)`` [C] to add to logits, or 0 when nothing is added."""
    adjustment = logit_adjustment(prior, strength)
    return 0.0 if adjustment is None else adjustment


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == labels).double().mean().item() if labels.numel() else float("nan")


def _or(value: Optional[torch.Tensor], default: torch.Tensor) -> torch.Tensor:
    return default if value is None else value
