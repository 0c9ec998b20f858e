"""The baseline objectives NCL is compared with, as a pure function over expert logits and a thin module: plain
cross-entropy per expert, or Balanced Softmax CE per expert (Ren et al. 2020), summed over experts.

They live next to :mod:`ncl_hub.losses` (NCL's own terms) and follow its conventions: logits ``[K, B, C]``, float32
log space whatever the autocast dtype, no loop over experts, the module keeps ``log_prior`` as a buffer and has
``NCLLoss``'s call signature, so the trainer treats every objective alike.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from .losses import moco_loss, validate_class_counts

__all__ = ["ExpertCELoss", "expert_ce_loss"]


def expert_ce_loss(logits: torch.Tensor, target: torch.Tensor, log_prior: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """Cross-entropy of every expert, summed over experts, batch-averaged.

    Args:
        logits: expert logits [K, B, C].
        target: class indices [B].
        log_prior: log(class_counts) [C] added to the logits (Balanced Softmax CE), or None (plain CE).

    Returns:
        scalar sum_k mean_b -log softmax(z_k + log_prior)[y].
    """
    z = logits.float() if log_prior is None else logits.float() + log_prior
    logp = z.log_softmax(-1)
    return -logp.gather(-1, target.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1).mean(-1).sum()


class ExpertCELoss(nn.Module):
    """Binds :func:`expert_ce_loss` (``balanced``: with log(class_counts)) and the MoCo term; returns
    ``{"ce", "loss"}`` (and ``"con"`` with MoCo inputs), like ``NCLLoss``.

    Args:
        class_counts: training images per class [C]; every count must be > 0.
        balanced: Balanced Softmax CE instead of plain CE.
        contrastive_weight: weight of L_con when MoCo outputs are given to ``forward``.
        temperature: MoCo temperature tau.
    """

    log_prior: torch.Tensor

    def __init__(self, class_counts: Union[torch.Tensor, Sequence[float]], *, balanced: bool,
                 contrastive_weight: float = 1.0, temperature: float = 0.2):
        super().__init__()
        counts = validate_class_counts(class_counts)
        self.register_buffer("log_prior", counts.log() if balanced else torch.zeros_like(counts), persistent=False)
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, target: torch.Tensor, query: Optional[torch.Tensor] = None,
                key: Optional[torch.Tensor] = None, queue: Optional[torch.Tensor] = None,
                anchor: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        ce = expert_ce_loss(logits, target, self.log_prior)
        out = {"ce": ce, "loss": ce}
        if query is not None:
            out["con"] = moco_loss(query, key, queue, self.temperature)
            out["loss"] = ce + self.contrastive_weight * out["con"]
        return out
