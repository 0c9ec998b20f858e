"""How a trained NCL model is deployed: the class prior of the deployment (logit adjustment), the calibration of its
probabilities (BCTS, fitted on validation data at the end of training) and a class prior estimated from unlabelled
images of the deployment. :class:`Deployment` is a mixin of :class:`ncl_hub.models.NCLModel`; everything here is
inference-only (the training forward never sees a prior or a calibration) and is rebuilt from ``config.json``'s
model_args (:meth:`Deployment.deployment_args`).

Order of operations for raw ensemble logits ``z`` [B, C] (the mean of the experts' logits):
``z -> z / T + b`` (calibration, optional) ``-> + tau * log(pi)`` (prior, optional) ``-> softmax``.
The model's ``forward`` returns ``z + tau * log(pi)`` (uncalibrated: logits keep their training scale);
:meth:`Deployment.probabilities` and :meth:`Deployment.predict_proba` give the calibrated probabilities.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch

from ..calibration import Calibration
from ..priors import PriorEstimate, PriorSpec, check_prior, estimate_prior, logit_adjustment, resolve_prior

__all__ = ["Deployment", "ImagesLike"]

ImagesLike = Union[torch.Tensor, Iterable[Any]]  # [N, 3, H, W], or batches: tensors or dicts with "pixel_values"


class Deployment:
    """Class prior, calibration and prior estimation of an NCL model (a mixin: see the module docstring).

    Attributes:
        class_counts: training images per class [C] (what ``class_prior="train"`` means), or None.
        class_prior: the deployment prior as set: None (balanced), ``"train"`` or C normalised numbers.
        prior_strength: tau of the adjustment.
        prior_estimate: when the prior was estimated (:meth:`fit_class_prior`): how (images, shrinkage, EM
            diagnostics), else None.
        calibration: the BCTS maps as a JSON-able dict (``{"ensemble": {...}, "experts": [...] or None,
            "prior_shrinkage": a, ...}``, see :func:`ncl_hub.calibration.fit_model_calibration`), or None.
    """

    num_classes: int
    num_experts: int
    logit_adjustment: Optional[torch.Tensor]

    def _init_deployment(self, class_counts: Optional[Sequence[float]], class_prior: PriorSpec,
                         prior_strength: float, calibration: Optional[Dict[str, Any]],
                         prior_estimate: Optional[Dict[str, Any]]) -> None:
        self.class_counts: Optional[List[Union[int, float]]] = None
        self.class_prior: Union[None, str, List[float]] = None
        self.prior_strength = 1.0
        self.calibration: Optional[Dict[str, Any]] = None
        # tau * log(pi) [C], float; not in the state dict: config.json model_args rebuild it
        self.register_buffer("logit_adjustment", None, persistent=False)
        if class_counts is not None:
            self.set_class_counts(class_counts)
        self.set_class_prior(class_prior, prior_strength)
        self.prior_estimate = dict(prior_estimate) if prior_estimate else None
        self.set_calibration(calibration)

    # ------------------------------------------------------------------ class prior
    @property
    def class_names(self) -> List[str]:
        """The C class names (``pretrained_cfg["label_names"]``), else "0" .. "C-1"."""
        return self.label_names or [str(i) for i in range(self.num_classes)]

    @property
    def label_names(self) -> Optional[List[str]]:
        """The class names the model knows (None before timm has given it its ``pretrained_cfg``, or without)."""
        names = (getattr(self, "pretrained_cfg", None) or {}).get("label_names")
        return [str(n) for n in names] if names and len(names) == self.num_classes else None

    def set_class_counts(self, class_counts: Optional[Sequence[float]]) -> "Deployment":
        """Record the training images per class [C] (what ``class_prior="train"`` uses); None forgets them."""
        if class_counts is None:
            self.class_counts = None
            return self
        check_prior(class_counts, self.num_classes, "class_counts")
        self.class_counts = [int(c) if float(c).is_integer() else float(c) for c in class_counts]
        return self

    def set_class_prior(self, prior: PriorSpec = None, strength: float = 1.0) -> "Deployment":
        """Adjust every inference output to a deployment class prior: logits + ``strength * log(pi)``.

        Logit adjustment (Menon et al. 2021): NCL's logits estimate the balanced posterior, so for a test prior
        pi the Bayes-optimal logits add ``log(pi)`` (``strength`` = 1). Applies to ``forward``, ``forward_head``,
        ``forward_experts``, :meth:`probabilities` and every expert taken with ``expert``; not to
        ``forward_train``. A prior set here is the user's: it forgets an earlier :meth:`fit_class_prior` record.

        Args:
            prior: None (balanced, no adjustment), ``"uniform"`` (the same), ``"train"`` (the training class
                frequencies, ``self.class_counts``), C non-negative numbers (normalised here), a mapping with
                them under ``"prior"``, or the path of a JSON or text file of them (as ``recipes/predict.py
                --class-prior estimate`` writes). A zero means the class is never predicted.
            strength: tau >= 0; 0 turns the adjustment off.

        Raises:
            ValueError: a wrong length, a negative, non-finite or all-zero prior, a negative or non-finite
                strength, ``"train"`` without known class counts, or a prior on a model without classifier.
        """
        self.prior_estimate = None
        if prior is not None and self.num_classes == 0:
            raise ValueError("this model has no classifier (num_classes=0); it cannot take a class prior")
        resolved = resolve_prior(prior, self.num_classes, self.class_counts, class_names=self.label_names)
        adjustment = logit_adjustment(resolved, strength)  # validates strength
        self.prior_strength = float(strength)
        if resolved is None:
            self.class_prior = None
        else:
            self.class_prior = "train" if isinstance(prior, str) and prior == "train" else resolved.tolist()
        if adjustment is not None:
            param = next(self.parameters(), None)
            adjustment = adjustment.to(device=param.device if param is not None else None, dtype=torch.float32)
        self.logit_adjustment = adjustment
        return self

    def _adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., C] logits plus the prior adjustment (unchanged without a prior)."""
        if self.logit_adjustment is None:
            return logits
        return logits + self.logit_adjustment.to(device=logits.device, dtype=logits.dtype)

    # ------------------------------------------------------------------ calibration
    def set_calibration(self, calibration: Optional[Dict[str, Any]]) -> "Deployment":
        """Attach BCTS calibration maps (``fit_model_calibration``'s dict, checked here), or None to drop them.

        Raises:
            ValueError: a map of the wrong number of classes, or an ``experts`` list that is not one per expert.
        """
        if calibration is None:
            self.calibration = None
            return self
        if not isinstance(calibration, dict) or "ensemble" not in calibration:
            raise ValueError("calibration must be a dict with an 'ensemble' map (and optionally 'experts')")
        Calibration.from_dict(calibration["ensemble"], self.num_classes)
        experts = calibration.get("experts")
        if experts is not None:
            if len(experts) != self.num_experts:
                raise ValueError(f"calibration has {len(experts)} expert maps but the model has {self.num_experts} "
                                 "experts")
            for entry in experts:
                Calibration.from_dict(entry, self.num_classes)
        self.calibration = dict(calibration)
        return self

    def calibrate(self, logits: torch.Tensor, expert: Optional[int] = None) -> torch.Tensor:
        """Raw logits [..., C] of the ensemble (or of expert ``expert``) through their calibration map; unchanged
        (as float32) when the model carries none."""
        if not self.calibration:
            return logits.float()
        entry = self.calibration["ensemble"] if expert is None else (self.calibration.get("experts") or [None] * (
            expert + 1))[expert]
        return Calibration.from_dict(entry).apply(logits) if entry else logits.float()

    def _subset_calibration(self, indices: Sequence[int]) -> Optional[Dict[str, Any]]:
        """The calibration of a model made of experts ``indices``: one expert's own map becomes its model's map; a
        subset of several keeps only its experts' maps (their ensemble was never fitted)."""
        experts = (self.calibration or {}).get("experts")
        if not experts:
            return None
        kept = [experts[i] for i in indices]
        ensemble = kept[0] if len(kept) == 1 else None
        if ensemble is None:
            return None
        return {**self.calibration, "ensemble": ensemble, "experts": kept}

    # ------------------------------------------------------------------ probabilities and prior estimation
    def raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the ensemble's raw logits [B, C]: no prior, no calibration."""
        return self._heads(self.forward_pooled(x)).mean(0)

    def probabilities(self, raw_logits: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Class probabilities [N, C] (float32) of raw ensemble logits [N, C], as the model is deployed: calibrated
        (when it carries a calibration and ``calibrated``), plus its class prior, softmax."""
        z = self.calibrate(raw_logits) if calibrated else raw_logits.float()
        return torch.softmax(self._adjust(z), dim=-1)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """[B, 3, H, W] -> calibrated class probabilities [B, C] under the model's class prior."""
        return self.probabilities(self.raw_logits(x), calibrated)

    @torch.no_grad()
    def _logits_of(self, images: ImagesLike, batch_size: int) -> torch.Tensor:
        """Raw ensemble logits [N, C] (CPU, float32) of images: a tensor [N, 3, H, W] or an iterable of batches."""
        param = next(self.parameters(), None)
        device = param.device if param is not None else None
        batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
        was_training = self.training
        self.train(False)
        try:
            out = [self.raw_logits((b["pixel_values"] if isinstance(b, dict) else b).to(device)).float().cpu()
                   for b in batches]
        finally:
            self.train(was_training)
        if not out:
            raise ValueError("no images: cannot estimate a class prior from nothing")
        return torch.cat(out)

    def estimate_class_prior(self, images: Optional[ImagesLike] = None, *, logits: Optional[torch.Tensor] = None,
                             shrinkage: Optional[float] = None, batch_size: int = 64, tol: float = 1e-6,
                             max_iter: int = 1000) -> PriorEstimate:
        """Estimate the class prior of unlabelled deployment images (EM on the calibrated probabilities, from the
        balanced prior the logits were trained for; :func:`ncl_hub.priors.estimate_prior`). Changes nothing.

        Args:
            images: a tensor [N, 3, H, W] (already transformed), or batches of them (a DataLoader yielding tensors
                or dicts with ``"pixel_values"``).
            logits: instead of images, their raw ensemble logits [N, C] (e.g. kept from a prediction pass).
            shrinkage: the weight of a uniform prior as a share of the images (None: the one chosen on validation
                data with the calibration, else 0).
            batch_size: images per forward pass when ``images`` is one tensor.
            tol, max_iter: EM's stopping rule.
        """
        if (images is None) == (logits is None):
            raise ValueError("give either images or logits")
        z = logits if logits is not None else self._logits_of(images, batch_size)
        if shrinkage is None:
            ensemble = (self.calibration or {}).get("ensemble") or {}
            shrinkage = float(_first(ensemble.get("prior_shrinkage"), (self.calibration or {}).get("prior_shrinkage"),
                                     0.0))
        return estimate_prior(self.calibrate(z), shrinkage=shrinkage, tol=tol, max_iter=max_iter)

    def fit_class_prior(self, images: Optional[ImagesLike] = None, *, logits: Optional[torch.Tensor] = None,
                        strength: float = 1.0, **kwargs: Any) -> PriorEstimate:
        """Adapt the model to its deployment in one call: :meth:`estimate_class_prior` on the images (or
        ``logits``), then :meth:`set_class_prior` with the estimate. Exports keep the prior and a record of how it
        was estimated (``prior_estimate``: images, shrinkage, EM diagnostics), which the model card states.

        Returns:
            the :class:`~ncl_hub.priors.PriorEstimate`.
        """
        estimate = self.estimate_class_prior(images, logits=logits, **kwargs)
        self.set_class_prior(estimate.prior.tolist(), strength)
        record = estimate.to_dict()
        self.prior_estimate = {k: v for k, v in record.items() if k != "prior"} | {
            "calibrated": bool(self.calibration)}
        return estimate

    def deployment_args(self) -> Dict[str, Any]:
        """The model_args that rebuild this deployment state with ``timm.create_model('ncl', **args)``."""
        args: Dict[str, Any] = {}
        if self.class_counts is not None:
            args["class_counts"] = list(self.class_counts)
        if self.class_prior is not None:
            args["class_prior"] = self.class_prior if isinstance(self.class_prior, str) else list(self.class_prior)
            args["prior_strength"] = self.prior_strength
            if self.prior_estimate:
                args["prior_estimate"] = dict(self.prior_estimate)
        if self.calibration:
            args["calibration"] = dict(self.calibration)
        return args


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
