"""NCL losses (Li et al., CVPR 2022, section 3) as pure functions over expert logits.

Shapes: K experts, B samples, C classes, D embedding size, N queue length.
Every function takes expert logits ``[K, B, C]`` and works in float32 log space, whatever the
autocast dtype of its inputs, and is vectorised over experts: no Python loop over experts or
expert pairs.

Two variants are offered:

* ``"paper"`` follows the paper's equations (3)-(12). Psi holds the ground truth plus the
  ``round(hard_ratio * C)`` negatives with the largest raw logits of an anchor expert, and the
  partial softmax runs over Psi only. NBOD is normalised by 1 / (K (K - 1)).
* ``"official"`` reproduces the authors' released code: the top-k of expert 0's raw logits with
  the ground truth forced in (k = round(hard_ratio * C) classes in total), balanced logits outside
  that set multiplied by 0 (so the softmax still spans all C classes), and NBOD weighted
  1 / (K - 1) over ordered pairs.

In both, the KL terms pass gradients to both sides (every expert is student and teacher), as in
the released code; the paper does not say otherwise.
"""
from __future__ import annotations

from typing import Dict, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .labels import check_labels

__all__ = [
    "balanced_logits",
    "hard_category_mask",
    "nil_loss",
    "nbod_loss",
    "moco_loss",
    "ncl_loss",
    "NCLLoss",
    "num_hard_classes",
    "validate_class_counts",
    "validate_target",
]

Variant = Literal["paper", "official"]
_VARIANTS = ("paper", "official")


def validate_class_counts(class_counts: Union[torch.Tensor, Sequence[float]]) -> torch.Tensor:
    """Return ``class_counts`` as a float tensor [C]; raise ValueError naming any class with count <= 0."""
    counts = torch.as_tensor(class_counts, dtype=torch.float32)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-d sequence, got shape {tuple(counts.shape)}")
    bad = torch.nonzero(~(counts > 0)).flatten().tolist()
    if bad:
        shown = ", ".join(f"class {i} has {counts[i].item():g}" for i in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise ValueError(
            f"class_counts must be positive for every class: {shown}{more}. A class with no training "
            "images cannot be balanced; drop it from the label set or add images."
        )
    return counts


def validate_target(target: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError naming the offending label if any target [B] is outside [0, num_classes)."""
    check_labels(target, num_classes, what="target")


def num_hard_classes(num_classes: int, hard_ratio: float) -> int:
    """round(hard_ratio * C), clamped to [0, C - 1]: the size of the hard-negative set."""
    if not 0.0 < hard_ratio < 1.0:
        raise ValueError(f"hard_ratio must be in (0, 1), got {hard_ratio}")
    return max(0, min(num_classes - 1, round(hard_ratio * num_classes)))


def balanced_logits(logits: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Balanced-Softmax logits zb = z + log n (paper eq. 2), in float32.

    Args:
        logits: raw logits [..., C] (any float dtype).
        log_prior: log class counts [C]; only its differences matter.

    Returns:
        float32 tensor of the same shape as ``logits``.
    """
    return logits.float() + log_prior.to(device=logits.device, dtype=torch.float32)


def hard_category_mask(
    logits: torch.Tensor,
    target: torch.Tensor,
    hard_ratio: float = 0.3,
    *,
    anchor: Union[None, int, torch.Tensor] = 0,
    variant: Variant = "paper",
) -> torch.Tensor:
    """Hard Category Mining (paper eq. 3): the set Psi of each sample as a boolean mask.

    Args:
        logits: raw (not balanced) expert logits [K, B, C]; the anchor expert's row chooses Psi.
        target: labels [B].
        hard_ratio: beta = C_hard / C.
        anchor: index of the anchor expert (an int, or a 1-element long tensor, which a compiled graph
            takes as an input); ``None`` draws one at random from the CPU torch RNG per call.
        variant: ``"paper"``: ground truth + round(beta C) hardest negatives;
            ``"official"``: round(beta C) classes in total, ground truth forced in.

    Returns:
        bool mask [B, C], True on Psi.
    """
    _check_variant(variant)
    num_experts, _, num_classes = logits.shape
    k = num_hard_classes(num_classes, hard_ratio)
    if anchor is None:
        # drawn on the CPU generator (saved with the run's RNG state), indexed without a host sync
        anchor = torch.randint(num_experts, (1,))
    if isinstance(anchor, torch.Tensor):
        pick = anchor.reshape(1).to(logits.device, non_blocking=True)
        z = logits.detach().index_select(0, pick)[0].float()
    elif -num_experts <= anchor < num_experts:
        z = logits[anchor].detach().float()
    else:
        raise ValueError(f"anchor={anchor} is not an expert index (K={num_experts})")
    is_target = F.one_hot(target, num_classes).bool()
    if variant == "paper":
        # the k largest negatives, then add the ground truth
        negatives = z.masked_fill(is_target, float("-inf"))
        idx = negatives.topk(k, dim=1).indices
        mask = torch.zeros_like(is_target).scatter_(1, idx, True)
        return mask | is_target
    # official: the ground truth is forced to the top, then top-k over the row (k classes in total)
    forced = z.masked_fill(is_target, float("inf"))
    idx = forced.topk(max(k, 1), dim=1).indices
    return torch.zeros_like(is_target).scatter_(1, idx, True)


def _restricted_log_softmax(zb: torch.Tensor, mask: Optional[torch.Tensor], variant: Variant) -> torch.Tensor:
    """log p over all classes (mask None), over Psi ("paper": -inf outside), or with zeros outside Psi
    ("official"). Outside Psi the "paper" result is -inf."""
    if mask is None:
        return zb.log_softmax(-1)
    if variant == "paper":
        return zb.masked_fill(~mask, float("-inf")).log_softmax(-1)
    return (zb * mask).log_softmax(-1)


def nil_loss(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Nested Individual Learning term (eq. 5 / 6): sum over experts of the batch-mean NLL.

    Args:
        log_probs: log-probabilities [K, B, C] (balanced; -inf allowed off the target class).
        target: labels [B].

    Returns:
        scalar: sum_k mean_b -log p_k[b, y_b].
    """
    picked = log_probs.gather(-1, target.view(1, -1, 1).expand(log_probs.shape[0], -1, 1))
    return -picked.squeeze(-1).mean(-1).sum()


def nbod_loss(log_probs: torch.Tensor, normalization: Literal["pairs", "experts"] = "pairs") -> torch.Tensor:
    """Nested Balanced Online Distillation term (eq. 8 / 9) over all ordered expert pairs.

    sum_{k != q} KL(p_k || p_q), averaged over the batch, then divided by K (K - 1)
    (``"pairs"``, the paper) or by K - 1 (``"experts"``, the released code). Computed in O(K)
    as sum_k sum_c p_k (K log p_k - sum_q log p_q); classes with p_k = 0 (outside Psi) add nothing.

    Args:
        log_probs: log-probabilities [K, B, C]; -inf marks classes outside the support.
        normalization: see above.

    Returns:
        scalar; 0 when K = 1.
    """
    num_experts = log_probs.shape[0]
    if num_experts < 2:
        return log_probs.new_zeros(())
    support = torch.isfinite(log_probs)
    logp = log_probs.masked_fill(~support, 0.0)
    p = logp.exp() * support
    # sum_q KL(p_k || p_q) per (k, b); >= 0 in exact arithmetic, clamped against rounding
    total = (p * (num_experts * logp - logp.sum(0, keepdim=True))).sum(-1).clamp_min(0.0)  # [K, B]
    denom = num_experts * (num_experts - 1) if normalization == "pairs" else num_experts - 1
    return total.sum(0).mean() / denom


def moco_loss(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2
) -> torch.Tensor:
    """InfoNCE of each expert's MoCo branch (paper eq. 11), summed over experts, batch-averaged.

    Args:
        query: L2-normalised query embeddings [K, B, D] (with gradient).
        key: L2-normalised key embeddings of the second view [K, B, D] (no gradient needed).
        queue: L2-normalised negatives [K, N, D].
        temperature: tau.

    Returns:
        scalar L_con = sum_k mean_b -log softmax([q.k+, q.Q] / tau)[0].
    """
    q = query.float()
    pos = (q * key.float()).sum(-1, keepdim=True)  # [K, B, 1]
    # autocast would run this matmul in half precision; the contrast needs float32 similarities
    with torch.autocast(device_type=q.device.type, enabled=False):
        neg = torch.bmm(q, queue.float().transpose(1, 2))  # [K, B, N]
    logits = torch.cat([pos, neg], dim=-1) / temperature
    return (logits.logsumexp(-1) - logits[..., 0]).mean(-1).sum()


def ncl_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_counts: Union[torch.Tensor, Sequence[float]],
    *,
    hard_ratio: float = 0.3,
    distill_weight: float = 0.6,
    anchor: Union[None, int, torch.Tensor] = None,
    variant: Variant = "paper",
    log_prior: Optional[torch.Tensor] = None,
    validate: bool = True,
    ramp: Union[float, torch.Tensor] = 1.0,
    hard_weight: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """The supervised NCL objective L_nil + lambda L_dis (paper eq. 7, 10, 12 without L_con).

    Args:
        logits: raw expert logits [K, B, C] (any float dtype; computed in float32).
        target: labels [B] in [0, C).
        class_counts: training images per class [C], all > 0.
        hard_ratio: beta, the share of classes mined as hard negatives.
        distill_weight: lambda.
        anchor: expert whose raw logits choose Psi; ``None`` draws one per call ("paper"). The
            "official" variant always uses expert 0.
        variant: ``"paper"`` or ``"official"`` (see the module docstring).
        log_prior: precomputed log(class_counts) [C]; skips the conversion (used by NCLLoss).
        validate: check counts and labels (one host sync); NCLLoss checks once per call.
        ramp: factor in [0, 1] on the hard-category and distillation terms (an option, not in the paper:
            ramping them in over the first steps); 1 is the paper's objective.
        hard_weight: weight of the hard-category terms nil_hard and nbod_hard (an option, not in the paper);
            1 is the paper's objective, 0 drops Hard Category Mining and leaves NIL and NBOD on all classes.

    Returns:
        dict of scalar tensors ``loss``, ``nil_all``, ``nil_hard``, ``nbod_all``, ``nbod_hard`` with
        loss = nil_all + ramp * (h nil_hard + distill_weight * (nbod_all + h nbod_hard)), h = hard_weight;
        the terms are unscaled.
    """
    _check_variant(variant)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [K, B, C], got shape {tuple(logits.shape)}")
    num_classes = logits.shape[-1]
    if log_prior is None:
        counts = validate_class_counts(class_counts) if validate else torch.as_tensor(class_counts).float()
        log_prior = counts.to(logits.device).log()
    if log_prior.numel() != num_classes:
        raise ValueError(f"class_counts has {log_prior.numel()} entries but logits have {num_classes} classes")
    if validate:
        validate_target(target, num_classes)
    if variant == "official":
        anchor = 0
    zb = balanced_logits(logits, log_prior)
    mask = hard_category_mask(logits, target, hard_ratio, anchor=anchor, variant=variant)
    logp_all = _restricted_log_softmax(zb, None, variant)
    logp_hard = _restricted_log_softmax(zb, mask, variant)
    normalization = "pairs" if variant == "paper" else "experts"
    out = {
        "nil_all": nil_loss(logp_all, target),
        "nil_hard": nil_loss(logp_hard, target),
        "nbod_all": nbod_loss(logp_all, normalization),
        "nbod_hard": nbod_loss(logp_hard, normalization),
    }
    # hard_weight 1 multiplies exactly: the paper's objective is unchanged to the last bit
    nil_hard, nbod_hard = hard_weight * out["nil_hard"], hard_weight * out["nbod_hard"]
    out["loss"] = out["nil_all"] + ramp * (nil_hard + distill_weight * (out["nbod_all"] + nbod_hard))
    return out


class NCLLoss(nn.Module):
    """Binds the NCL hyper-parameters and keeps log(class_counts) as a buffer.

    Args:
        class_counts: training images per class [C]; every count must be > 0.
        hard_ratio: beta.
        distill_weight: lambda.
        anchor: fixed anchor expert, or ``None`` for a random one per call.
        variant: ``"paper"`` or ``"official"``.
        contrastive_weight: weight of L_con when MoCo outputs are given to ``forward``.
        temperature: MoCo temperature tau.
        validate_targets: check labels on every call (one host sync per step; the trainer checks
            the dataset's labels once up front and turns this off).
        ramp_steps: ramp the hard-category and distillation terms in linearly over this many optimizer steps
            (``set_step`` tells the loss where training is); 0 = off, the paper's objective throughout.
        hard_weight: weight of the hard-category terms (1 = the paper; 0 = no Hard Category Mining).
    """

    log_prior: torch.Tensor
    ramp: torch.Tensor

    def __init__(
        self,
        class_counts: Union[torch.Tensor, Sequence[float]],
        *,
        hard_ratio: float = 0.3,
        distill_weight: float = 0.6,
        anchor: Optional[int] = None,
        variant: Variant = "paper",
        contrastive_weight: float = 1.0,
        temperature: float = 0.2,
        validate_targets: bool = True,
        ramp_steps: int = 0,
        hard_weight: float = 1.0,
    ):
        super().__init__()
        _check_variant(variant)
        num_hard_classes(2, hard_ratio)  # validates the range
        self.register_buffer("log_prior", validate_class_counts(class_counts).log(), persistent=False)
        self.hard_ratio = hard_ratio
        self.distill_weight = distill_weight
        self.anchor = anchor
        self.variant = variant
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.validate_targets = validate_targets
        if ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        self.ramp_steps = ramp_steps
        if not hard_weight >= 0:
            raise ValueError(f"hard_weight must be >= 0, got {hard_weight}")
        self.hard_weight = hard_weight
        # a buffer updated in place, so a compiled graph reads it as an input instead of recompiling per value
        self.register_buffer("ramp", torch.ones(()), persistent=False)
        self.set_step(0)

    def set_step(self, step: int) -> None:
        """Tell the loss how many optimizer steps are done (sets the ramp factor; a no-op without a ramp)."""
        if self.ramp_steps:
            self.ramp.fill_(min(1.0, (step + 1) / self.ramp_steps))

    @property
    def num_classes(self) -> int:
        return self.log_prior.numel()

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        query: Optional[torch.Tensor] = None,
        key: Optional[torch.Tensor] = None,
        queue: Optional[torch.Tensor] = None,
        anchor: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """logits [K, B, C], target [B]; optional MoCo query/key [K, B, D] and queue [K, N, D].

        ``anchor`` (a 1-element tensor) overrides a random anchor for this call: the trainer draws it
        outside a compiled graph so that compiled and eager runs use the same RNG stream.

        Returns the ``ncl_loss`` dict; with MoCo inputs, also ``con`` and the total includes
        ``contrastive_weight * con``.
        """
        if self.validate_targets:
            validate_target(target, self.num_classes)
        out = ncl_loss(
            logits, target, None, hard_ratio=self.hard_ratio, distill_weight=self.distill_weight,
            anchor=self.anchor if self.anchor is not None or anchor is None else anchor, variant=self.variant,
            log_prior=self.log_prior, validate=False, ramp=self.ramp if self.ramp_steps else 1.0,
            hard_weight=self.hard_weight,
        )
        if query is not None:
            if key is None or queue is None:
                raise ValueError("MoCo loss needs query, key and queue together")
            out["con"] = moco_loss(query, key, queue, self.temperature)
            out["loss"] = out["loss"] + self.contrastive_weight * out["con"]
        return out

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, hard_ratio={self.hard_ratio}, distill_weight={self.distill_weight}, "
                f"anchor={self.anchor}, variant={self.variant!r}, ramp_steps={self.ramp_steps}, "
                f"hard_weight={self.hard_weight}")


def _check_variant(variant: str) -> None:
    if variant not in _VARIANTS:
        raise ValueError(f"unknown NCL loss variant {variant!r}; choose one of {_VARIANTS}")
