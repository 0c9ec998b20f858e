"""NCL multi-expert models over any timm backbone.

An :class:`NCLModel` holds K independent timm trunks (built with ``num_classes=0``), one head per
expert (linear or cosine), and optionally a MoCo-v2 branch per expert for training. Inference
returns the mean of the experts' logits; ``forward_experts`` returns all of them, ``[K, B, C]``.
How the model is deployed (a class prior added to every inference output, the calibration of its probabilities,
a prior estimated from unlabelled images) is the :class:`~ncl_hub.models.deployment.Deployment` mixin; the
training forward never sees any of it.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict
from typing import Any, Callable, Dict, Optional, Sequence, Set, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

from ..config import MocoConfig
from ..priors import PriorSpec
from .batched import EXPERT_EXECUTION, run_stacked
from .deployment import Deployment
from .moco import MocoBranch

__all__ = ["CosineClassifier", "NCLModel", "CLASSIFIERS", "classifier_names"]

CLASSIFIERS = ("linear", "cosine")


class CosineClassifier(nn.Module):
    """logits = s * normalize(x) . normalize(W)^T + b, with b learned and zero-initialised.

    Args:
        in_features: D.
        num_classes: C.
        scale: s.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = num_classes
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, C]."""
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1)) + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


def _make_head(classifier: str, in_features: int, num_classes: int, cosine_scale: float) -> nn.Module:
    if num_classes <= 0:
        return nn.Identity()
    if classifier == "linear":
        return nn.Linear(in_features, num_classes)
    if classifier == "cosine":
        return CosineClassifier(in_features, num_classes, cosine_scale)
    raise ValueError(f"unknown classifier {classifier!r}; choose one of {CLASSIFIERS}")


class NCLModel(Deployment, nn.Module):
    """K experts over a timm backbone, with the timm model interface.

    Args:
        backbone: any timm model name (``resnet50``, ``convnext_tiny``, ``resnet32_cifar``, ...).
        num_classes: C; 0 gives concatenated pooled features from ``forward``.
        num_experts: K >= 1.
        classifier: ``"linear"`` or ``"cosine"``.
        cosine_scale: s of the cosine classifier.
        moco: MoCo-v2 branch config (training only), or None.
        pretrained_backbone: start every trunk from the backbone's timm pretrained weights.
        in_chans: input channels.
        class_counts: training images per class [C] (metadata: what ``class_prior="train"`` means; exports
            store it).
        class_prior: the class prior of the deployment, see :meth:`set_class_prior`. None: balanced logits.
        prior_strength: tau of the prior adjustment.
        calibration: BCTS maps of the ensemble and the experts (:meth:`set_calibration`), or None.
        prior_estimate: how ``class_prior`` was estimated (:meth:`fit_class_prior`), or None.
        drop_rate: dropout before each head (timm's ``drop_rate`` of the trunk).
        **backbone_kwargs: passed to ``timm.create_model`` for each trunk.

    Shapes: ``forward_experts`` [K, B, C]; ``forward`` [B, C] (mean over experts);
    ``forward_head(pre_logits=True)`` [B, K * D] (the experts' pooled features, concatenated).
    With a class prior, ``forward``, ``forward_head`` and ``forward_experts`` return logits + ``tau * log(pi)``;
    ``forward_train`` (the loss path) never does. :meth:`predict_proba` gives calibrated probabilities.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int = 1000,
        num_experts: int = 3,
        classifier: str = "linear",
        cosine_scale: float = 16.0,
        moco: Union[None, dict, MocoConfig] = None,
        pretrained_backbone: bool = False,
        in_chans: int = 3,
        class_counts: Optional[Sequence[float]] = None,
        class_prior: PriorSpec = None,
        prior_strength: float = 1.0,
        calibration: Optional[Dict[str, Any]] = None,
        prior_estimate: Optional[Dict[str, Any]] = None,
        **backbone_kwargs: Any,
    ):
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {classifier!r}; choose one of {CLASSIFIERS}")
        _check_backbone(backbone)
        moco_cfg = MocoConfig.from_any(moco)
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_experts = num_experts
        self.classifier = classifier
        self.cosine_scale = cosine_scale
        self.in_chans = in_chans
        self.trunks = nn.ModuleList(
            timm.create_model(backbone, pretrained=pretrained_backbone, num_classes=0, in_chans=in_chans,
                              **backbone_kwargs)
            for _ in range(num_experts)
        )
        self.expert_features = self.trunks[0].num_features
        self.num_features = self.head_hidden_size = num_experts * self.expert_features
        self.heads = nn.ModuleList(
            _make_head(classifier, self.expert_features, num_classes, cosine_scale) for _ in range(num_experts)
        )
        self.moco: Optional[MocoBranch] = (
            MocoBranch(self.trunks, self.expert_features, moco_cfg) if moco_cfg is not None else None
        )
        self.moco_cfg = moco_cfg
        self.backbone_kwargs = dict(backbone_kwargs)
        self.expert_execution = "sequential"
        self._init_deployment(class_counts, class_prior, prior_strength, calibration, prior_estimate)

    def set_expert_execution(self, mode: str) -> "NCLModel":
        """``"sequential"`` (default): the experts run one after the other. ``"batched"``: the K trunks, heads,
        MoCo key encoders and projections each run as one vmapped computation (grouped convolutions; for small
        trunks on a GPU). Same outputs, gradients and buffer updates; a runtime setting, not saved with weights.
        """
        if mode not in EXPERT_EXECUTION:
            raise ValueError(f"unknown expert execution {mode!r} (model.expert_execution); "
                             f"choose one of {EXPERT_EXECUTION}")
        self.expert_execution = mode
        return self

    def _batched(self) -> bool:
        return self.expert_execution == "batched" and self.num_experts > 1

    def model_args(self, include_moco: bool = False) -> Dict[str, Any]:
        """Keyword arguments that rebuild this architecture with ``timm.create_model('ncl', **args)``."""
        args = dict(
            backbone=self.backbone, num_classes=self.num_classes, num_experts=self.num_experts,
            classifier=self.classifier, cosine_scale=self.cosine_scale, in_chans=self.in_chans,
            **self.backbone_kwargs,
        )
        args.update(self.deployment_args())
        if include_moco and self.moco_cfg is not None:
            args["moco"] = asdict(self.moco_cfg)
        return args

    @torch.no_grad()
    def adopt_experts(self, classifiers: Sequence[nn.Module]) -> "NCLModel":
        """Take K built timm classifiers over this model's backbone (plain-timm exports loaded with
        ``timm.create_model``) as its experts: each one without its classifier becomes a trunk, and the classifier
        becomes the head when it is a linear layer of this model's shape (else the head is kept). Returns self."""
        if len(classifiers) != self.num_experts:
            raise ValueError(f"{len(classifiers)} classifiers for a model with K={self.num_experts} experts")
        for k, net in enumerate(classifiers):
            head = net.get_classifier()
            net.reset_classifier(0)
            if net.num_features != self.expert_features:
                raise ValueError(f"classifier {k} has {net.num_features} features, the trunks {self.expert_features}")
            self.trunks[k] = net
            if isinstance(head, nn.Linear) and isinstance(self.heads[k], nn.Linear) and \
                    head.weight.shape == self.heads[k].weight.shape:
                self.heads[k] = head
        self.reset_momentum_encoders()
        return self

    # ------------------------------------------------------------------ timm interface
    @torch.jit.ignore
    def get_classifier(self) -> nn.ModuleList:
        return self.heads

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New heads for ``num_classes`` on every expert (0 removes them); trunks are kept. Another class count
        also forgets the class counts, the class prior and the calibration (they described the old classes)."""
        if num_classes != self.num_classes:
            self.class_counts = None
            self.set_class_prior(None)
            self.set_calibration(None)
        self.num_classes = num_classes
        if global_pool is not None:
            for trunk in self.trunks:
                trunk.reset_classifier(0, global_pool)
        device = next(self.trunks.parameters()).device
        self.heads = nn.ModuleList(
            _make_head(self.classifier, self.expert_features, num_classes, self.cosine_scale).to(device)
            for _ in range(self.num_experts)
        )
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for trunk in self.trunks:
            trunk.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The trunk's parameter groups, matched across every expert (layer i of all experts together)."""
        inner = self.trunks[0].group_matcher(coarse=coarse)
        return {name: _prefix_matcher(pattern, r"^trunks\.\d+\.") for name, pattern in inner.items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        names: Set[str] = set()
        for k, trunk in enumerate(self.trunks):
            if hasattr(trunk, "no_weight_decay"):
                names |= {f"trunks.{k}.{n}" for n in trunk.no_weight_decay()}
        return names

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the trunks' unpooled features stacked, [K, B, ...]."""
        return torch.stack([trunk.forward_features(x) for trunk in self.trunks])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[K, B, ...] features -> ensemble logits [B, C], or pooled features [B, K * D] (``pre_logits``)."""
        pooled = [trunk.forward_head(f, pre_logits=True) for trunk, f in zip(self.trunks, x.unbind(0))]
        if pre_logits or self.num_classes == 0:
            return torch.cat(pooled, dim=-1)
        return self._adjust(torch.stack([head(f) for head, f in zip(self.heads, pooled)]).mean(0))

    def forward_pooled(self, x: torch.Tensor, trunks: Optional[Sequence[Callable]] = None) -> torch.Tensor:
        """[B, 3, H, W] -> each expert's pooled features [K, B, D]. ``trunks``: callables standing in for the
        trunks (their compiled versions), or None."""
        if self._batched():
            return run_stacked(self.trunks, x)
        return torch.stack([trunk(x) for trunk in (trunks if trunks is not None else self.trunks)])

    def _heads(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features [K, B, D] -> logits [K, B, C], each expert through its own head."""
        if self._batched():
            return run_stacked(self.heads, pooled, per_module_input=True)
        return torch.stack([head(f) for head, f in zip(self.heads, pooled.unbind(0))])

    def forward_experts(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> every expert's logits [K, B, C] (prior-adjusted when a class prior is set)."""
        if self.num_classes == 0:
            raise RuntimeError("this model has no classifier (num_classes=0); use forward_pooled")
        return self._adjust(self._heads(self.forward_pooled(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> ensemble logits [B, C] (mean of the experts' logits; prior-adjusted when a class prior
        is set)."""
        if self.num_experts == 1:  # a single expert costs exactly its trunk and head
            return self._adjust(self.heads[0](self.trunks[0](x)))
        if self.num_classes == 0:
            return self.forward_pooled(x).permute(1, 0, 2).flatten(1)
        return self.forward_experts(x).mean(0)

    # ------------------------------------------------------------------ training
    def forward_train(self, x: torch.Tensor, x_key: Optional[torch.Tensor] = None, *,
                      trunks: Optional[Sequence[Callable]] = None,
                      key_trunks: Optional[Sequence[Callable]] = None) -> Dict[str, torch.Tensor]:
        """Training forward: expert logits and, with MoCo and a key view, the contrastive inputs.

        Args:
            x: query view [B, 3, H, W].
            x_key: second augmented view [B, 3, H, W] for the key encoders (MoCo only).
            trunks, key_trunks: callables used in place of the query / key trunks (``torch.compile`` of each,
                see ``training.TrainStep.compile_trunks``); None runs the modules themselves.

        Returns:
            dict with ``logits`` [K, B, C] (raw: the class prior of :meth:`set_class_prior` is not added, the
            loss needs the model's own logits); with MoCo and ``x_key``: ``query`` [K, B, dim], ``key`` [K, B, dim]
            (no gradient) and ``queue`` [K, N, dim]. ``queue`` is the buffer itself (no copy: it is large):
            enqueue the new keys only after the backward pass.
        """
        pooled = self.forward_pooled(x, trunks)
        out = {"logits": self._heads(pooled)}
        if self.moco is not None and x_key is not None:
            out["query"] = self.moco.project_queries(pooled, batched=self._batched())
            out["key"] = self.moco.encode_keys(x_key, key_trunks, batched=self._batched())
            out["queue"] = self.moco.queue
        return out

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA step of every key encoder towards its query encoder (no-op without MoCo)."""
        if self.moco is not None:
            self.moco.momentum_update(self.trunks)

    @torch.no_grad()
    def reset_momentum_encoders(self) -> None:
        """Make every key encoder an exact copy of its query encoder (after loading weights)."""
        if self.moco is not None:
            self.moco.copy_from_query(self.trunks)

    # ------------------------------------------------------------------ experts and export
    def subset(self, indices: Sequence[int]) -> "NCLModel":
        """A standalone NCLModel with the chosen experts (deep copies, no MoCo branch)."""
        indices = [int(i) for i in indices]
        if not indices or any(not 0 <= i < self.num_experts for i in indices):
            raise ValueError(f"expert indices {indices} out of range for K={self.num_experts}")
        moco, self.moco = self.moco, None
        try:
            trunks = [copy.deepcopy(self.trunks[i]) for i in indices]
            heads = [copy.deepcopy(self.heads[i]) for i in indices]
            self.trunks, self.heads, saved = nn.ModuleList(), nn.ModuleList(), (self.trunks, self.heads)
            try:
                new = copy.deepcopy(self)
            finally:
                self.trunks, self.heads = saved
        finally:
            self.moco = moco
        new.trunks, new.heads = nn.ModuleList(trunks), nn.ModuleList(heads)
        new.num_experts = len(indices)
        new.num_features = new.head_hidden_size = new.num_experts * new.expert_features
        new.moco_cfg = None
        new.calibration = self._subset_calibration(indices)
        cfg = dict(getattr(self, "pretrained_cfg", {}) or {})
        for key in ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict"):
            cfg.pop(key, None)  # these weights are no longer the source's
        cfg["classifier"] = classifier_names(new.num_experts)
        first = cfg.get("first_conv")
        if first:  # the trunk's stem names, re-indexed for the new experts
            names = (first,) if isinstance(first, str) else tuple(first)
            stems = sorted({n.split(".", 2)[2] for n in names if n.startswith("trunks.0.")})
            cfg["first_conv"] = tuple(f"trunks.{k}.{n}" for k in range(new.num_experts) for n in stems) or None
        cfg["tag"] = f"expert{indices[0]}" if len(indices) == 1 else "subset"
        new.pretrained_cfg = new.default_cfg = cfg
        return new

    def expert(self, index: int) -> "NCLModel":
        """Expert ``index`` as a standalone single-expert NCLModel (K = 1, deep copy, no MoCo)."""
        return self.subset([index])

    def inference_state_dict(self) -> Dict[str, torch.Tensor]:
        """state_dict without the MoCo branch: what exports and the inference model hold."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("moco.")}

    def num_inference_params(self) -> int:
        """Parameters used at inference (trunks and heads; the MoCo branch excluded)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("moco."))


def classifier_names(num_experts: int) -> tuple:
    """timm ``pretrained_cfg['classifier']`` entry for K heads."""
    return tuple(f"heads.{k}" for k in range(num_experts))


def _check_backbone(backbone: str) -> None:
    if not isinstance(backbone, str) or not timm.is_model(backbone):
        import difflib

        close = difflib.get_close_matches(str(backbone), timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise ValueError(f"unknown timm backbone {backbone!r}.{hint}")
    if backbone == "ncl" or backbone.startswith("ncl_"):
        raise ValueError(f"backbone {backbone!r} is itself an NCL model; pass its trunk (e.g. 'resnet50')")


def _prefix_matcher(pattern: Any, prefix: str) -> Any:
    """Prefix a timm group_matcher pattern (a regex string or a list of (regex, ordinal))."""
    if isinstance(pattern, str):
        body = re.sub(r"\|\^", "|", pattern[1:] if pattern.startswith("^") else pattern)
        return f"{prefix}(?:{body})"
    if isinstance(pattern, (list, tuple)):
        return [(_prefix_matcher(p, prefix), *rest) for p, *rest in pattern]
    return pattern
