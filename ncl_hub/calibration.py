"""Calibrating Balanced-Softmax logits: bias-corrected temperature scaling (BCTS), NLL and ECE.

BCTS (Alexandari, Kundaje & Shrikumar, ICML 2020) maps logits ``z`` [..., C] to ``z / T + b`` with a temperature
``T > 0`` and a bias ``b`` [C]. It is the calibration that EM label-shift estimation
(:func:`ncl_hub.priors.estimate_prior`) needs: the estimate is only as good as the posteriors, and the per-class
bias corrects the systematic class-wise miscalibration that plain temperature scaling cannot.

The logits of NCL (Balanced Softmax) are posteriors under a balanced (uniform) class prior, but the labelled split
the calibration is fitted on (a validation split) may follow any prior ``pi_fit`` and may lack classes entirely.
:func:`fit_bcts` therefore fits the model of that split,

    ``log p(y | x) = log_softmax(z / T + b + log pi_fit)_y``,

by minimising the mean NLL (plus a small ridge on ``b``), and :meth:`Calibration.apply` returns ``z / T + b``: the
calibrated logits for the balanced prior, ready for a prior adjustment or for EM. ``pi_fit`` is the split's label
frequencies unless the caller gives one.

Identifiability: adding a constant to ``b`` changes no softmax, so ``b`` is centred (mean 0) over the classes
present in the fit split (``pi_fit > 0``); a class absent from it has no data, drops out of the softmax
(``log 0 = -inf``) and keeps ``b = 0`` exactly, i.e. the mean bias of the present classes (its logits are only
temperature-scaled). The ridge ``l2 * ||b||^2`` only regularises: it keeps the bias of a class whose few fit
samples are all separable from running off, and ``l2 = 0`` is allowed.

Shapes: N samples, C classes, M confidence bins.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .priors import check_labelled_logits, check_prior, select_shrinkage

__all__ = ["Calibration", "METHODS", "fit_bcts", "fit_model_calibration", "nll", "expected_calibration_error"]

METHODS = ("none", "temperature", "bcts")

_FIELDS = ("temperature", "bias", "fitted_on", "nll_before", "nll_after", "method", "prior_shrinkage")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Calibration:
    """A fitted BCTS map ``z -> z / T + b``; construction validates the fields (ValueError naming the field).

    Attributes:
        temperature: ``T``, finite and > 0.
        bias: ``b`` [C], finite floats (0 for classes absent from the fit split).
        fitted_on: labelled samples it was fitted on (0 for :meth:`identity`).
        nll_before: mean NLL (nats) of the fit split before calibration, under the fit split's prior
            (``log_softmax(z + log pi_fit)``); None when not fitted.
        nll_after: the same after calibration (``log_softmax(z / T + b + log pi_fit)``, without the ridge).
        method: ``"bcts"``, ``"temperature"`` (b = 0) or ``"none"`` (the identity), as chosen by
            :func:`fit_model_calibration`.
        prior_shrinkage: the shrinkage of :func:`ncl_hub.priors.estimate_prior` chosen for this model's calibrated
            probabilities (None: not chosen).
    """

    temperature: float
    bias: List[float]
    fitted_on: int = 0
    nll_before: Optional[float] = None
    nll_after: Optional[float] = None
    method: str = "bcts"
    prior_shrinkage: Optional[float] = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if isinstance(self.bias, (str, bytes)) or not isinstance(self.bias, Sequence) or not self.bias \
                or not all(_is_number(b) and math.isfinite(b) for b in self.bias):
            raise ValueError(f"bias must be a non-empty list of finite numbers (one per class), got {self.bias!r}")
        if isinstance(self.fitted_on, bool) or not isinstance(self.fitted_on, int) or self.fitted_on < 0:
            raise ValueError(f"fitted_on must be an integer >= 0, got {self.fitted_on!r}")
        for name in ("nll_before", "nll_after"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or math.isnan(value) or value < 0):
                raise ValueError(f"{name} must be None or a number >= 0, got {value!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        kappa = self.prior_shrinkage
        if kappa is not None and (not _is_number(kappa) or not math.isfinite(kappa) or kappa < 0):
            raise ValueError(f"prior_shrinkage must be None or a finite number >= 0, got {self.prior_shrinkage!r}")
        self.temperature = float(self.temperature)
        self.bias = [float(b) for b in self.bias]

    @property
    def num_classes(self) -> int:
        """C."""
        return len(self.bias)

    @classmethod
    def identity(cls, num_classes: int) -> "Calibration":
        """The map that changes nothing: ``T = 1``, ``b = 0`` [C]."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        return cls(temperature=1.0, bias=[0.0] * num_classes)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated balanced-prior logits ``logits / T + b``.

        Args:
            logits: [..., C], any dtype, any device.

        Returns:
            [..., C] on the same device, in float64 for float64 input and float32 otherwise (bf16 / fp16 logits
            are upcast: a bias added in half precision loses the small differences that calibration is about).
        """
        if logits.ndim == 0 or logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits must have shape [..., {self.num_classes}] (the calibration's classes), got "
                             f"shape {tuple(logits.shape)}")
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        bias = torch.tensor(self.bias, dtype=dtype, device=logits.device)
        return logits.to(dtype) / self.temperature + bias

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain Python numbers (None for missing diagnostics), ready for JSON."""
        return {"temperature": self.temperature, "bias": list(self.bias), "fitted_on": self.fitted_on,
                "nll_before": self.nll_before, "nll_after": self.nll_after, "method": self.method,
                "prior_shrinkage": self.prior_shrinkage}

    @classmethod
    def from_dict(cls, data: Dict[str, Any], num_classes: Optional[int] = None) -> "Calibration":
        """Read :meth:`to_dict`'s output; ``num_classes``, when given, must match the bias length.

        Raises:
            ValueError: not a dict, a missing ``temperature`` / ``bias``, an unknown key, an invalid field value,
                or a bias of the wrong length.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a calibration must be a dict with keys {list(_FIELDS)}, got {type(data).__name__}")
        missing = [k for k in ("temperature", "bias") if k not in data]
        unknown = sorted(set(data) - set(_FIELDS))
        if missing or unknown:
            raise ValueError(f"calibration dict: missing keys {missing}, unknown keys {unknown}; expected "
                             f"{list(_FIELDS)}")
        calibration = cls(**data)
        if num_classes is not None and calibration.num_classes != num_classes:
            raise ValueError(f"bias has {calibration.num_classes} entries but the model has {num_classes} classes")
        return calibration


def _fit_log_prior(labels: torch.Tensor, num_classes: int, fit_prior: Optional[Sequence[float]]) -> torch.Tensor:
    """``log pi_fit`` [C] (float64, ``-inf`` for classes with prior 0); every label must have a positive prior."""
    if fit_prior is None:
        prior = torch.bincount(labels.cpu(), minlength=num_classes).double() / labels.numel()
    else:
        prior = check_prior(fit_prior, num_classes, "fit_prior")
        ruled_out = torch.unique(labels.cpu()[prior[labels.cpu()] == 0]).tolist()
        if ruled_out:
            raise ValueError(f"fit_prior is 0 for classes {ruled_out[:10]} that occur in labels: a prior of 0 "
                             f"rules a class out, so give those classes a positive prior")
    return prior.log()


def _split_nll(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, log_t: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``log_softmax(z * exp(-log_t) + b + log pi)`` (0-d, float64, differentiable)."""
    log_p = torch.log_softmax(logits * torch.exp(-log_t) + bias + log_prior, dim=1)
    return -log_p.gather(1, labels[:, None]).mean()


def _lbfgs(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, fit_bias: bool, l2: float,
           max_iter: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimise the fit split's NLL over ``log T`` and the centred bias [S] (S present classes), from T=1, b=0."""
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    free = torch.zeros(logits.shape[1], dtype=torch.float64, device=logits.device, requires_grad=fit_bias)
    params = [log_t, free] if fit_bias else [log_t]
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        bias = free - free.mean()  # centred over the present classes: b is identifiable without the ridge
        loss = _split_nll(logits, labels, log_prior, log_t, bias) + l2 * bias.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return log_t.detach(), (free - free.mean()).detach()


def fit_bcts(logits: torch.Tensor, labels: Union[torch.Tensor, Sequence[int]], *,
             fit_prior: Optional[Sequence[float]] = None, max_iter: int = 200, bias: bool = True,
             l2: float = 1e-4) -> Calibration:
    """Fit BCTS to balanced-prior logits on a labelled split (see the module docstring for the model).

    Args:
        logits: balanced-prior logits [N, C] of the fit split (any float dtype; fitted in float64).
        labels: their classes [N].
        fit_prior: the fit split's class prior [C] (counts or probabilities); None: the label frequencies.
            Classes with prior 0 are left out of the fit (bias 0); a label of such a class is an error.
        max_iter: L-BFGS iterations (strong-Wolfe line search), from ``T = 1``, ``b = 0``.
        bias: False fits the temperature only (plain temperature scaling; ``b = 0``).
        l2: ridge strength on the centred bias, added to the mean NLL (>= 0).

    Returns:
        a :class:`Calibration`.

    Raises:
        ValueError: invalid logits, labels, prior or settings, or a fit that diverged (non-finite T or b).
    """
    z, y = check_labelled_logits(logits, labels)
    num_samples, num_classes = z.shape
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not _is_number(l2) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    log_prior = _fit_log_prior(y, num_classes, fit_prior).to(z.device)
    present = torch.nonzero(torch.isfinite(log_prior)).flatten()
    # absent classes drop out of the softmax: fit on the present columns, with the labels renumbered
    position = torch.full((num_classes,), -1, dtype=torch.long, device=z.device)
    position[present] = torch.arange(present.numel(), device=z.device)
    z_present, y_present, log_prior_present = z[:, present], position[y], log_prior[present]
    log_t, bias_present = _lbfgs(z_present, y_present, log_prior_present, bias, float(l2), max_iter)
    if not (torch.isfinite(log_t) and torch.isfinite(bias_present).all()):
        raise ValueError("the BCTS fit diverged (non-finite temperature or bias); the fit split may be perfectly "
                         "separable: fit on more or harder samples, or raise l2")
    full_bias = torch.zeros(num_classes, dtype=torch.float64, device=z.device)
    full_bias[present] = bias_present
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    before = _split_nll(z_present, y_present, log_prior_present, zero, torch.zeros_like(bias_present))
    after = _split_nll(z_present, y_present, log_prior_present, log_t, bias_present)
    return Calibration(temperature=math.exp(log_t.item()), bias=full_bias.cpu().tolist(), fitted_on=num_samples,
                       nll_before=before.item(), nll_after=after.item())


def nll(logits: torch.Tensor, labels: Union[torch.Tensor, Sequence[int]]) -> float:
    """Mean negative log-likelihood (nats) of ``labels`` [N] under ``softmax(logits)`` [N, C], in float64."""
    z, y = check_labelled_logits(logits, labels)
    return -torch.log_softmax(z, dim=1).gather(1, y[:, None]).mean().item()


def expected_calibration_error(logits: torch.Tensor, labels: Union[torch.Tensor, Sequence[int]],
                               num_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al. 2017), in [0, 1].

    Confidence is the max softmax probability; M equal-width bins ``(lo, hi]`` over [0, 1];
    ``ECE = sum_b |sum_{i in b} (correct_i - conf_i)| / N``.

    Args:
        logits: [N, C]; labels: [N]; num_bins: M >= 1.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
    z, y = check_labelled_logits(logits, labels)
    log_conf, predicted = torch.log_softmax(z, dim=1).max(dim=1)
    conf = log_conf.exp()
    gap = (predicted == y).double() - conf
    edges = torch.arange(num_bins + 1, dtype=torch.float64, device=z.device) / num_bins  # k / M, rounded once
    bins = torch.bucketize(conf, edges[1:-1], right=False)  # (lo, hi]
    per_bin = torch.zeros(num_bins, dtype=torch.float64, device=z.device).index_add_(0, bins, gap)
    return per_bin.abs().sum().item() / y.numel()


# ---------------------------------------------------------------------------------------------- a model
BIAS_PRIOR_SD = 0.5  # a Gaussian prior on each class bias (logits): a ridge 1 / (2 sd^2 N) on the mean NLL
MIN_SAMPLES_TO_CHOOSE = 40  # fewer labelled images: temperature scaling, no choice
CHOICE_GRID = {"sample_sizes": (500,), "draws": 2}  # the resampled priors the methods are compared on (11 x 1 x 2 sets)


def _fit(method: str, logits: torch.Tensor, labels: torch.Tensor) -> Calibration:
    """The map of ``method`` fitted on a labelled split: ``none`` (the identity, with its NLL recorded),
    ``temperature`` (T only) or ``bcts`` (T and a bias per class, the bias regularised by ``BIAS_PRIOR_SD``)."""
    if method == "none":
        before = fit_bcts(logits, labels, max_iter=1, bias=False).nll_before
        return Calibration(1.0, [0.0] * logits.shape[1], fitted_on=len(labels), nll_before=before, nll_after=before,
                           method="none")
    if method == "temperature":
        return dataclasses.replace(fit_bcts(logits, labels, bias=False), method="temperature")
    return fit_bcts(logits, labels, l2=1.0 / (2 * BIAS_PRIOR_SD ** 2 * len(labels)))


def _folds(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """0 / 1 per sample [N]: two halves, stratified by class (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(labels)
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        fold[members[torch.randperm(len(members), generator=generator)]] = torch.arange(len(members)) % 2
    return fold


def _out_of_fold(method: str, logits: torch.Tensor, labels: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
    """Logits [N, C] calibrated out of fold: each half through the map of ``method`` fitted on the other half."""
    out = torch.empty_like(logits)
    for k in (0, 1):
        fit, apply = fold != k, fold == k
        out[apply] = _fit(method, logits[fit], labels[fit]).apply(logits[apply]).to(out.dtype)
    return out


def _choose(logits: torch.Tensor, labels: torch.Tensor, class_counts: Optional[Sequence[float]]
            ) -> Tuple[Calibration, Dict[str, Dict[str, float]]]:
    """The calibration method and prior-estimation shrinkage whose probabilities, calibrated out of fold, estimate
    shifted priors of the split best (lowest mean L1 error, :func:`ncl_hub.priors.select_shrinkage`; a simpler method
    among equals), its map refitted on the whole split; and each method's out-of-fold NLL and L1 error."""
    if len(labels) < MIN_SAMPLES_TO_CHOOSE:
        calibration = _fit("temperature", logits, labels)
        shrinkage, _ = select_shrinkage(calibration.apply(logits), labels, class_order_counts=class_counts)
        return dataclasses.replace(calibration, prior_shrinkage=shrinkage), {}
    fold = _folds(labels)
    scores: Dict[str, Dict[str, float]] = {}
    held_out = {}
    for method in METHODS:  # compared on a smaller resampling grid (the full one costs 7.5 times as much)
        held_out[method] = _out_of_fold(method, logits, labels, fold)
        shrinkage, table = select_shrinkage(held_out[method], labels, class_order_counts=class_counts,
                                            **CHOICE_GRID)
        scores[method] = {"nll": nll(held_out[method], labels), "prior_l1": table[shrinkage],
                          "shrinkage": shrinkage}
    best = min(METHODS, key=lambda m: (round(scores[m]["prior_l1"], 6), METHODS.index(m)))
    shrinkage, _ = select_shrinkage(held_out[best], labels, class_order_counts=class_counts)  # the winner's, in full
    return dataclasses.replace(_fit(best, logits, labels), prior_shrinkage=shrinkage), scores


def fit_model_calibration(expert_logits: torch.Tensor, labels: Union[torch.Tensor, Sequence[int]], *,
                          class_counts: Optional[Sequence[float]] = None, split: str = "val") -> Dict[str, Any]:
    """Calibrate a multi-expert model on a labelled split, for its ensemble (the mean of the experts' logits) and
    each expert: a calibration method (``none``, ``temperature`` or ``bcts``) and the shrinkage of the prior
    estimate, chosen together.

    The choice is what the calibration is for here, estimating a deployment's class prior: the split is cut in two
    stratified halves, each calibrated by the method fitted on the other half, and the method and shrinkage whose
    out-of-fold probabilities estimate the split's resampled shifted priors with the lowest L1 error win
    (:func:`ncl_hub.priors.select_shrinkage`, test priors over the training order). Out of fold matters: EM's error
    on a test set comes mostly from the calibration's own error, which in-sample probabilities would not show, and
    the out-of-fold NLL alone can prefer no calibration where a per-class bias is what EM needs. The methods are
    compared on a smaller resampling grid (``CHOICE_GRID``: 500 samples, 2 draws per prior); the winner's shrinkage
    is then chosen on the full grid, and its map refitted on the whole split.

    Args:
        expert_logits: raw logits [K, N, C] of the split (no class prior added).
        labels: [N].
        class_counts: training images per class [C] (the long-tail order of the simulated test priors).
        split: the split's name, recorded.

    Returns:
        a JSON-able dict: ``{"fit_split", "num_samples", "ensemble": Calibration.to_dict(), "experts": [K of
        them], "methods": {"ensemble": m, "experts": [K]}, "prior_shrinkage": the ensemble's, "held_out":
        {"ensemble": {method: {"nll", "prior_l1", "shrinkage"}}}}`` (``NCLModel.set_calibration`` takes it).
    """
    if expert_logits.ndim != 3:
        raise ValueError(f"expert_logits must be [K, N, C], got shape {tuple(expert_logits.shape)}")
    logits, y = check_labelled_logits(expert_logits.detach().double().mean(0), labels)
    y = y.cpu()
    ensemble, scores = _choose(logits, y, class_counts)
    experts = [_choose(check_labelled_logits(z.double(), y)[0], y, class_counts)[0] for z in expert_logits.detach()]
    return {"fit_split": split, "num_samples": int(logits.shape[0]), "ensemble": ensemble.to_dict(),
            "experts": [e.to_dict() for e in experts], "prior_shrinkage": ensemble.prior_shrinkage,
            "methods": {"ensemble": ensemble.method, "experts": [e.method for e in experts]},
            "held_out": {"ensemble": {m: {k: round(v, 6) for k, v in row.items()} for m, row in scores.items()}}}
