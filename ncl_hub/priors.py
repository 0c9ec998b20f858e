"""Class priors for deployment: checking them, long-tailed test priors, and logit adjustment.

NCL is trained with Balanced Softmax, so its logits estimate the posterior under a balanced class prior. When the
test (deployment) prior is ``pi``, the Bayes-optimal prediction is ``argmax_c z_c + log pi_c`` (Menon et al., ICLR
2021, logit adjustment); ``tau * log(pi)`` with a strength ``tau`` interpolates between the balanced model
(``tau = 0``) and that adjustment (``tau = 1``). Everything stays in log space: a class with prior 0 gets an
adjustment of ``-inf`` and is never predicted.

The test priors of the shifted-prior evaluation follow SADE (Zhang et al., NeurIPS 2022): over the classes in the
training split's order (most training images first), ``pi_i`` proportional to ``r ** (-i / (C - 1))`` for a test
imbalance ``r``. ``r > 1`` is a forward long tail (the head is ``r`` times as frequent as the tail), ``r < 1`` a
backward one (the tail becomes the head) and ``r = 1`` is uniform.

When the test prior is unknown, :func:`estimate_prior` estimates it from unlabelled test logits by EM (Saerens,
Latinne & Decaestecker, Neural Computation 2002). The logits must be calibrated for a known source prior ``pi_s``
(uniform for Balanced-Softmax logits; see :mod:`ncl_hub.calibration`): ``p_s(c|x) = softmax(z)_c``. Under a
test prior ``pi`` the posterior is ``p(c|x) = p_s(c|x) pi_c / pi_s_c / w(x)`` with the per-sample weight
``w(x) = sum_c p_s(c|x) pi_c / pi_s_c = p(x) / p_s(x)``. EM alternates

* E-step: ``p_ic = softmax(z_i + log pi - log pi_s)_c`` (log space);
* M-step: ``pi_c = (sum_i p_ic + a) / (N + C a)`` with ``a = kappa N / C``, i.e.
  ``pi_c = (mean_i p_ic + kappa / C) / (1 + kappa)``,

where ``kappa >= 0`` (``shrinkage``) weighs a uniform prior as ``kappa`` times the sample: the MAP estimate under
a symmetric Dirichlet ``(1 + a)`` prior whose pseudo-counts ``a`` grow with the sample, so that the pull towards
uniform is the same share of the evidence at any N (``kappa = 0`` is maximum likelihood). Each step increases the
(penalised) log-likelihood ``sum_i log w(x_i)``. Why shrink at all: EM turns small calibration errors into large
prior errors when the classifier confuses classes (its confusion matrix is then near-singular), and a
calibration fitted on a few hundred validation images has such errors. :func:`select_shrinkage` picks ``kappa``
on labelled validation data resampled to the shifted test priors above, with probabilities calibrated out of
fold (:func:`ncl_hub.calibration.fit_model_calibration`), so the choice sees the calibration error a test set
will see.

Shapes: N samples, C classes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .labels import check_labels

__all__ = [
    "TEST_IMBALANCES", "PriorSpec", "check_prior", "check_prior_strength", "resolve_prior", "logit_adjustment",
    "training_order", "long_tailed_prior", "format_imbalance", "describe_prior", "load_prior_file",
    "check_logits", "check_labelled_logits", "PriorEstimate", "estimate_prior", "SHRINKAGE_CANDIDATES",
    "select_shrinkage",
]

# forward 50 ... 2, uniform, backward 1/2 ... 1/50 (SADE's test-agnostic protocol)
TEST_IMBALANCES = (50.0, 25.0, 10.0, 5.0, 2.0, 1.0, 1 / 2, 1 / 5, 1 / 10, 1 / 25, 1 / 50)
PRIOR_NAMES = ("train", "uniform")

PriorSpec = Union[None, str, os.PathLike, Sequence[float], torch.Tensor, Mapping[str, Any]]


def check_prior(prior: Union[Sequence[float], torch.Tensor], num_classes: int, what: str = "class_prior"
                ) -> torch.Tensor:
    """Validate a class prior and normalise it to sum 1.

    Args:
        prior: C non-negative finite numbers (counts or probabilities; zeros allowed, not all zero).
        num_classes: C.
        what: the name used in error messages.

    Returns:
        the prior [C], float64, summing to 1.

    Raises:
        ValueError: not a flat sequence of numbers, the wrong length, a negative or non-finite value, or all zeros.
    """
    try:
        values = torch.as_tensor(prior, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} must be a sequence of {num_classes} numbers, got {prior!r}") from e
    if values.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of {num_classes} numbers, got shape {tuple(values.shape)}")
    if values.numel() != num_classes:
        raise ValueError(f"{what} has {values.numel()} entries but the model has {num_classes} classes")
    bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
    if bad:
        raise ValueError(f"{what} has non-finite values (inf or nan) at classes {bad[:10]}")
    bad = torch.nonzero(values < 0).flatten().tolist()
    if bad:
        raise ValueError(f"{what} has negative values at classes {bad[:10]} (e.g. {values[bad[0]].item():g}); "
                         f"a prior is C non-negative numbers")
    total = values.sum()
    if not total > 0:
        raise ValueError(f"{what} is all zeros: at least one class needs a positive prior")
    return values / total


def check_prior_strength(strength: float) -> float:
    """``tau`` as a float; raises ValueError unless it is a finite number >= 0."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"prior_strength must be a finite number >= 0, got {strength!r}")
    return float(strength)


def resolve_prior(prior: PriorSpec, num_classes: int, class_counts: Optional[Sequence[float]] = None, *,
                  class_names: Optional[Sequence[str]] = None) -> Optional[torch.Tensor]:
    """A prior specification as a normalised prior [C] (float64), or None for the balanced model.

    Args:
        prior: None (balanced), ``"uniform"`` (the same: a uniform prior shifts every logit by one constant, so
            it changes no prediction and no probability), ``"train"`` (the training class frequencies,
            ``class_counts``), C non-negative numbers, a mapping with them under ``"prior"`` (and optionally their
            ``"class_names"``), or the path of a file of them (:func:`load_prior_file`).
        num_classes: C.
        class_counts: training images per class [C], needed for ``"train"``.
        class_names: the model's C class names: a prior that names its classes must name the same, in order.
    """
    if prior is None:
        return None
    if isinstance(prior, (str, os.PathLike)):
        if prior == "uniform":
            return None
        if prior == "train":
            if class_counts is None:
                raise ValueError("class_prior='train' needs the training class counts, and none are known: pass "
                                 "class_counts=[...] (an export made by ncl_hub stores them in config.json)")
            return check_prior(class_counts, num_classes, "class_counts (for class_prior='train')")
        if not os.path.isfile(prior):
            raise ValueError(f"unknown class_prior {str(prior)!r}; choose one of {PRIOR_NAMES}, None, "
                             f"{num_classes} numbers, or a file of them")
        prior = load_prior_file(prior, class_names=class_names)
    if isinstance(prior, Mapping):
        prior = _prior_of_mapping(prior, class_names)
    return check_prior(prior, num_classes)


def _prior_of_mapping(record: Mapping[str, Any], class_names: Optional[Sequence[str]], where: str = "class prior"
                      ) -> List[float]:
    """The ``"prior"`` numbers of a prior record (as ``recipes/predict.py --class-prior estimate`` writes it),
    checked against the model's class names when the record names its classes."""
    if "prior" not in record:
        raise ValueError(f"{where} is a mapping without a 'prior' list (keys: {sorted(record)[:8]})")
    names = record.get("class_names")
    if names is not None and class_names is not None and [str(n) for n in names] != [str(n) for n in class_names]:
        raise ValueError(f"{where} is for the classes {list(names)[:5]}..., the model's are "
                         f"{list(class_names)[:5]}...: a prior is only valid for the classes, in the order, it was "
                         "made for")
    return record["prior"]


def logit_adjustment(prior: Optional[torch.Tensor], strength: float) -> Optional[torch.Tensor]:
    """``tau * log(pi)`` [C] (float64; ``-inf`` where ``pi`` is 0), or None when nothing is added.

    Args:
        prior: a normalised prior [C] (see :func:`check_prior`), or None.
        strength: ``tau >= 0``; 0 means no adjustment (also for classes with prior 0).
    """
    strength = check_prior_strength(strength)
    if prior is None or strength == 0:
        return None
    log_prior = prior.double().log()  # log(0) = -inf
    return torch.where(torch.isinf(log_prior), log_prior, strength * log_prior)


def training_order(class_counts: Sequence[float]) -> List[int]:
    """Class ids from the most to the fewest training images (ties by class id): the long tail's order."""
    counts = [float(c) for c in class_counts]
    return sorted(range(len(counts)), key=lambda c: (-counts[c], c))


def long_tailed_prior(class_counts: Sequence[float], imbalance: float) -> torch.Tensor:
    """The test prior of test imbalance ``r`` over the training order: ``pi`` [C] (float64, sums to 1).

    The class of rank i (0 = most training images) gets weight ``r ** (-i / (C - 1))``: the head class is ``r``
    times as frequent as the tail class, with an exponential profile in between (the usual long-tail profile).
    ``r < 1`` reverses it; ``r = 1`` (or C = 1) is uniform.
    """
    if not (isinstance(imbalance, (int, float)) and math.isfinite(imbalance) and imbalance > 0):
        raise ValueError(f"test imbalance must be a finite number > 0, got {imbalance!r}")
    order = training_order(class_counts)
    num_classes = len(order)
    if num_classes == 0:
        raise ValueError("class_counts is empty")
    ranks = torch.empty(num_classes, dtype=torch.float64)
    ranks[torch.tensor(order)] = torch.arange(num_classes, dtype=torch.float64)
    exponent = -ranks / max(1, num_classes - 1)
    weights = torch.exp(exponent * math.log(imbalance))
    return weights / weights.sum()


def format_imbalance(imbalance: float) -> str:
    """``50``, ``1``, ``1/50``: how a test imbalance reads in tables."""
    if imbalance >= 1:
        return f"{imbalance:g}"
    inverse = 1 / imbalance
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{imbalance:g}"


def describe_prior(class_prior: Union[None, str, Sequence[float]], strength: Optional[float]) -> Optional[str]:
    """A stored class prior (``"train"``, C normalised numbers, or None) in words, for reports and cards."""
    if class_prior is None:
        return None
    tau = "" if strength is None else f", strength tau = {strength:g}"
    if isinstance(class_prior, str):
        what = "the training class frequencies" if class_prior == "train" else repr(class_prior)
        return f"{what} (class_prior={class_prior!r}{tau})"
    values = [float(v) for v in class_prior]
    zeros = sum(v == 0 for v in values)
    ratio = max(values) / min(v for v in values if v > 0)
    text = f"a custom prior over {len(values)} classes (largest / smallest non-zero {ratio:.3g}"
    return text + (f", {zeros} class(es) at 0: never predicted" if zeros else "") + f"{tau})"


def load_prior_file(path: Union[str, os.PathLike], class_names: Optional[Sequence[str]] = None) -> List[float]:
    """Read a class prior from a file: a JSON list of C numbers, a JSON object with them under ``"prior"`` (what
    ``recipes/predict.py --class-prior estimate`` writes; its ``"class_names"``, when present, must be
    ``class_names``), or text with C numbers separated by spaces, commas or new lines (``#`` starts a comment).
    Raises ValueError naming the file when it holds anything else."""
    import json
    import re
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class prior file {str(path)!r} does not exist (expected 'train', 'uniform' or a file)")
    text = path.read_text(encoding="utf-8")
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"class prior file {str(path)!r} is not valid JSON: {e}") from e
        if isinstance(values, dict):
            values = _prior_of_mapping(values, class_names, f"class prior file {str(path)!r}")
    else:
        tokens = [t for line in text.splitlines() for t in re.split(r"[\s,]+", line.split("#", 1)[0]) if t]
        try:
            values = [float(t) for t in tokens]
        except ValueError as e:
            raise ValueError(f"class prior file {str(path)!r} must hold numbers only: {e}") from e
    if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"class prior file {str(path)!r} must hold a non-empty list of numbers")
    return [float(v) for v in values]


# ------------------------------------------------------------------------------------ label-shift estimation
SHRINKAGE_CANDIDATES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_EM_BATCH_ELEMENTS = 1 << 24  # float64 entries of the resampled logits per EM batch (128 MiB)


def check_logits(logits: torch.Tensor, what: str = "logits") -> torch.Tensor:
    """Validate logits [N, C] and return them detached as float64 (on their device).

    Raises:
        ValueError: not a floating-point tensor, not 2-D, no samples or no classes, or a non-finite value.
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        kind = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{what} must be a floating-point torch.Tensor [N, C], got {kind}")
    if logits.ndim != 2:
        raise ValueError(f"{what} must have shape [N, C], got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(logits.shape)}): need at least one sample and one class")
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{what} has non-finite values (inf or nan), first in sample {row}")
    return logits.detach().double()


def check_labelled_logits(logits: torch.Tensor, labels: Union[torch.Tensor, Sequence[int]]
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate logits [N, C] and their labels [N] together.

    Returns:
        the logits as float64 (see :func:`check_logits`) and the labels as int64 on the logits' device.

    Raises:
        ValueError: invalid logits, labels that are not class indices in [0, C)
            (:func:`ncl_hub.labels.check_labels`), or a number of labels other than N.
    """
    z = check_logits(logits)
    check_labels(labels, z.shape[1])
    y = labels.detach() if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    if y.ndim != 1 or y.numel() != z.shape[0]:
        raise ValueError(f"labels has shape {tuple(y.shape)} but the logits have {z.shape[0]} samples")
    return z, y.to(device=z.device, dtype=torch.long)


@dataclass
class PriorEstimate:
    """The result of :func:`estimate_prior`.

    Attributes:
        prior: the estimated test prior [C] (float64, CPU, sums to 1; 0 where the source prior is 0).
        iterations: EM updates made.
        converged: whether the last update moved no class by ``tol`` or more (max-norm); False at ``max_iter``.
        log_likelihood: ``mean_i log w_i`` with ``w_i = sum_c p_s(c|x_i) pi_c / pi_s_c``: the mean log-likelihood
            ratio ``log p(x) / p_s(x)`` of the samples under the estimate versus the source prior (0 when the
            estimate is the source prior; larger is a better fit).
        effective_sample_size: Kish's ``(sum_i w_i)^2 / sum_i w_i^2`` of the same weights, in (0, N]: how many
            samples of the source distribution the test samples are worth (N when ``pi = pi_s``).
        num_samples: N.
        shrinkage: the shrinkage ``kappa`` used (the uniform prior's weight as a share of the sample).
    """

    prior: torch.Tensor
    iterations: int
    converged: bool
    log_likelihood: float
    effective_sample_size: float
    num_samples: int
    shrinkage: float

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python numbers (the prior as a list), ready for JSON."""
        return {"prior": [float(p) for p in self.prior.tolist()], "iterations": int(self.iterations),
                "converged": bool(self.converged), "log_likelihood": float(self.log_likelihood),
                "effective_sample_size": float(self.effective_sample_size), "num_samples": int(self.num_samples),
                "shrinkage": float(self.shrinkage)}


def _check_number(value: Any, what: str, *, positive: bool = False) -> float:
    """``value`` as a float; raises ValueError unless it is a finite number >= 0 (> 0 with ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _check_count(value: Any, what: str) -> int:
    """``value`` as an int; raises ValueError unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def _source_log_likelihood(logits: torch.Tensor, source_prior: Optional[PriorSpec]
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``log p_s(c|x) - log pi_s(c)`` [N, S] over the S classes with a positive source prior, and their ids [S].

    Only differences within a row matter to EM. The posteriors are renormalised over those S classes: a class with
    source prior 0 cannot occur, whatever probability the logits give it.
    """
    num_classes = logits.shape[1]
    if source_prior is None:
        pi_s = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    else:
        pi_s = check_prior(source_prior, num_classes, "source_prior")
    support = torch.nonzero(pi_s > 0).flatten().to(logits.device)
    log_pi_s = pi_s.to(logits.device)[support].log()
    return torch.log_softmax(logits[:, support], dim=1) - log_pi_s, support


def _em(log_lik: torch.Tensor, shrinkage: torch.Tensor, tol: float, max_iter: int
        ) -> Tuple[torch.Tensor, int, torch.Tensor]:
    """EM for the prior over S classes, K runs at once (one per pseudo-count), all stopped together.

    The E-step ``p_ic = softmax(log_lik_i + log pi)_c`` is evaluated as ``E_ic pi_c / (E pi)_i`` with
    ``E = exp(log_lik - max_c log_lik)`` [*B, N, S]: the max-shift of log-sum-exp taken once, so every row of E
    holds a 1 and nothing overflows, and each iteration is two matrix products instead of a softmax over
    [*B, K, N, S]. Only posteriors below ``e^-745`` times the row's largest underflow to 0, as in log space; a
    class whose prior underflows to 0 stays at 0 (as ``log 0 = -inf`` would).

    Args:
        log_lik: ``log p_s(c|x) - log pi_s(c)`` [*B, N, S].
        shrinkage: Dirichlet pseudo-counts per class ``a`` [K] (the same for every batch entry).
        tol: a run has converged once an update moves no class by ``tol`` or more; iteration stops when all have.
        max_iter: the most updates.

    Returns:
        the priors [*B, K, S] (float64), the updates made, and which runs converged [*B, K] (bool).
    """
    num_samples, num_support = log_lik.shape[-2:]
    scaled = torch.exp(log_lik - log_lik.amax(-1, keepdim=True))  # E [*B, N, S], entries in [0, 1]
    a = shrinkage.to(device=log_lik.device, dtype=torch.float64).unsqueeze(-1)  # [K, 1]
    shape = (*log_lik.shape[:-2], a.shape[0], num_support)
    prior = torch.full(shape, 1.0 / num_support, dtype=torch.float64, device=log_lik.device)
    tiny = torch.finfo(torch.float64).tiny
    converged = torch.zeros(shape[:-1], dtype=torch.bool, device=log_lik.device)
    iterations = 0
    while iterations < max_iter:
        norm = (scaled @ prior.transpose(-1, -2)).clamp_min(tiny)  # (E pi)_i [*B, N, K]; >= pi of the row's max
        expected = prior * (scaled.transpose(-1, -2) @ norm.reciprocal()).transpose(-1, -2)  # sum_i p_ic [*B, K, S]
        updated = (expected + a) / (num_samples + num_support * a)
        converged = (updated - prior).abs().amax(-1) < tol
        prior = updated
        iterations += 1
        if bool(converged.all()):
            break
    return prior, iterations, converged


def estimate_prior(logits: torch.Tensor, *, source_prior: Optional[PriorSpec] = None, tol: float = 1e-6,
                   max_iter: int = 1000, shrinkage: float = 0.0) -> PriorEstimate:
    """Estimate the class prior of unlabelled samples by EM (Saerens et al. 2002; see the module docstring).

    Args:
        logits: calibrated logits [N, C] whose softmax is the posterior under ``source_prior`` (e.g. Balanced-
            Softmax logits after :func:`ncl_hub.calibration.fit_bcts` and ``Calibration.apply``).
        source_prior: the prior the logits are calibrated for: None (uniform, Balanced Softmax) or C
            non-negative numbers (see :func:`check_prior`). Classes with source prior 0 get prior 0.
        tol: stop once an update moves no class by ``tol`` or more (max-norm of the change, probability units).
        max_iter: the most EM updates; ``converged`` is False when they run out.
        shrinkage: ``kappa >= 0``, the weight of a uniform prior (over the classes the source prior allows) as a
            share of the sample: MAP under a Dirichlet with ``kappa N / C`` pseudo-counts per class (module
            docstring); 0 is maximum likelihood.

    Returns:
        a :class:`PriorEstimate` (prior [C], float64, on the CPU).
    """
    z = check_logits(logits)
    num_samples, num_classes = z.shape
    a = _check_number(shrinkage, "shrinkage")
    tol = _check_number(tol, "tol", positive=True)
    max_iter = _check_count(max_iter, "max_iter")
    log_lik, support = _source_log_likelihood(z, source_prior)
    counts = torch.tensor([a * num_samples / support.numel()], dtype=torch.float64)  # pseudo-counts per class
    prior_s, iterations, converged = _em(log_lik, counts, tol, max_iter)
    prior_s = prior_s[0]
    log_w = torch.logsumexp(log_lik + prior_s.log(), dim=1)  # [N]: log sum_c p_s(c|x) pi_c / pi_s_c
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
    prior = torch.zeros(num_classes, dtype=torch.float64)
    prior[support.cpu()] = prior_s.cpu()
    return PriorEstimate(prior=prior, iterations=iterations, converged=bool(converged), num_samples=num_samples,
                         log_likelihood=log_w.mean().item(), effective_sample_size=ess.item(), shrinkage=a)


def _check_candidates(candidates: Sequence[float]) -> List[float]:
    values = [_check_number(c, "each shrinkage candidate") for c in candidates]
    if not values:
        raise ValueError("candidates is empty: give at least one shrinkage strength")
    if len(set(values)) != len(values):
        raise ValueError(f"candidates has repeated values: {values}")
    return values


def select_shrinkage(logits: torch.Tensor, labels: Union[torch.Tensor, Sequence[int]], *,
                     candidates: Sequence[float] = SHRINKAGE_CANDIDATES, sample_sizes: Sequence[int] = (100, 500, 2000),
                     imbalances: Sequence[float] = TEST_IMBALANCES, draws: int = 5, seed: int = 0,
                     source_prior: Optional[PriorSpec] = None, class_order_counts: Optional[Sequence[float]] = None,
                     tol: float = 1e-6, max_iter: int = 1000) -> Tuple[float, Dict[float, float]]:
    """Choose the shrinkage of :func:`estimate_prior` on labelled validation data (never the test split).

    For every test imbalance r, sample size n and draw: n validation samples are drawn with replacement so that
    their class follows ``long_tailed_prior(class_order_counts, r)``, the prior is estimated from their logits
    alone with every candidate, and each estimate is scored by its L1 distance to the prior the sample was drawn
    from. Classes without validation samples cannot be drawn: the target prior is renormalised over the present
    classes (the absent ones count 0 in it, so an estimate that gives them mass pays for it).

    Args:
        logits: calibrated validation logits [N, C] (as for :func:`estimate_prior`).
        labels: their classes [N].
        candidates: shrinkage strengths ``kappa`` to compare (a share of the sample, see :func:`estimate_prior`).
        sample_sizes: test-set sizes n to simulate; pick them near the expected deployment sizes.
        imbalances: test imbalances r (default: SADE's protocol, 50 ... 1/50).
        draws: resampled sets per (r, n).
        seed: seeds the torch.Generator of the resampling; the result is a function of the arguments.
        source_prior: the prior the logits are calibrated for (None: uniform).
        class_order_counts: training class counts [C], which fix the long-tail order (None: class id order).
        tol, max_iter: passed to EM.

    Returns:
        the candidate with the lowest mean L1 (the first listed among equals), and ``{candidate: mean L1}`` over
        all ``len(imbalances) * len(sample_sizes) * draws`` sets.
    """
    z, y = check_labelled_logits(logits, labels)
    y, num_classes = y.cpu(), z.shape[1]
    values = _check_candidates(candidates)
    sizes = [_check_count(n, "each sample size") for n in sample_sizes]
    draws = _check_count(draws, "draws")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    tol, max_iter = _check_number(tol, "tol", positive=True), _check_count(max_iter, "max_iter")
    order = [1.0] * num_classes if class_order_counts is None else \
        check_prior(class_order_counts, num_classes, "class_order_counts").tolist()
    if not imbalances:
        raise ValueError("imbalances is empty: give at least one test imbalance")
    log_lik, support = _source_log_likelihood(z, source_prior)
    class_sizes = torch.bincount(y, minlength=num_classes).double()
    kappa = torch.tensor(values, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(values), dtype=torch.float64)
    for imbalance in imbalances:
        target = long_tailed_prior(order, imbalance) * (class_sizes > 0)
        target = target / target.sum()
        weights = (target / class_sizes.clamp(min=1))[y]  # sample weights: class by target, uniform within it
        for size in sizes:
            idx = torch.multinomial(weights.expand(draws, -1), size, replacement=True, generator=generator)
            counts = kappa * size / support.numel()  # each candidate's pseudo-counts per class at this size
            total += _resampled_l1(log_lik, idx.to(z.device), support, target, counts, tol, max_iter)
    runs = len(imbalances) * len(sizes) * draws
    table = {v: float(t) / runs for v, t in zip(values, total.tolist())}
    best = values[int(torch.argmin(total))]  # argmin returns the first minimum
    return best, table


def _resampled_l1(log_lik: torch.Tensor, idx: torch.Tensor, support: torch.Tensor, target: torch.Tensor,
                  a: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """Summed over draws, the L1 error [K] of each candidate's EM estimate on the resampled sets ``idx`` [D, n]."""
    draws, size = idx.shape
    chunk = max(1, _EM_BATCH_ELEMENTS // (size * support.numel()))
    errors = torch.zeros(a.numel(), dtype=torch.float64)
    for start in range(0, draws, chunk):
        prior_s, _, _ = _em(log_lik[idx[start:start + chunk]], a, tol, max_iter)  # [D', K, S]
        estimate = torch.zeros(*prior_s.shape[:2], target.numel(), dtype=torch.float64)
        estimate[..., support.cpu()] = prior_s.cpu()
        errors += (estimate - target).abs().sum(-1).sum(0)
    return errors
