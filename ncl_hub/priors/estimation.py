"""Estimating the class prior of unlabelled deployment images: EM label-shift estimation.

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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..labels import check_labels
from .adjustment import TEST_IMBALANCES, PriorSpec, check_prior, long_tailed_prior

__all__ = ["SHRINKAGE_CANDIDATES", "PriorEstimate", "check_labelled_logits", "check_logits", "estimate_prior",
           "select_shrinkage"]

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
                     tol: float = 1e-5, max_iter: int = 1000) -> Tuple[float, Dict[float, float]]:
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
        tol, max_iter: passed to EM (a looser tolerance than :func:`estimate_prior`'s: the mean L1 errors compared
            here are about 0.1, and 1e-5 per class moves them by less than 1e-3 while saving most updates).

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
    sets: Dict[int, List[torch.Tensor]] = {size: [] for size in sizes}  # per size: the draws' indices [D, n]
    targets: Dict[int, List[torch.Tensor]] = {size: [] for size in sizes}  # and their priors [D, C]
    for imbalance in imbalances:
        target = long_tailed_prior(order, imbalance) * (class_sizes > 0)
        target = target / target.sum()
        weights = (target / class_sizes.clamp(min=1))[y]  # sample weights: class by target, uniform within it
        for size in sizes:
            sets[size].append(torch.multinomial(weights.expand(draws, -1), size, replacement=True,
                                                generator=generator))
            targets[size].append(target.expand(draws, -1))
    total = torch.zeros(len(values), dtype=torch.float64)
    for size in sizes:  # the sets of one size (every imbalance) in one batched EM: the loop's cost is per update
        counts = kappa * size / support.numel()  # each candidate's pseudo-counts per class at this size
        total += _resampled_l1(log_lik, torch.cat(sets[size]).to(z.device), support, torch.cat(targets[size]),
                               counts, tol, max_iter)
    runs = len(imbalances) * len(sizes) * draws
    table = {v: float(t) / runs for v, t in zip(values, total.tolist())}
    best = values[int(torch.argmin(total))]  # argmin returns the first minimum
    return best, table


def _resampled_l1(log_lik: torch.Tensor, idx: torch.Tensor, support: torch.Tensor, target: torch.Tensor,
                  a: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """Summed over draws, the L1 error [K] of each candidate's EM estimate on the resampled sets ``idx`` [D, n],
    each scored against its own prior ``target`` [D, C]."""
    draws, size = idx.shape
    chunk = max(1, _EM_BATCH_ELEMENTS // (size * support.numel()))
    errors = torch.zeros(a.numel(), dtype=torch.float64)
    for start in range(0, draws, chunk):
        prior_s, _, _ = _em(log_lik[idx[start:start + chunk]], a, tol, max_iter)  # [D', K, S]
        estimate = torch.zeros(*prior_s.shape[:2], target.shape[-1], dtype=torch.float64)
        estimate[..., support.cpu()] = prior_s.cpu()
        errors += (estimate - target[start:start + chunk, None]).abs().sum(-1).sum(0)
    return errors
