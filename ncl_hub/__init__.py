"""ncl-hub: Nested Collaborative Learning (Li et al., CVPR 2022) for timm and the Hugging Face stack.

``import ncl_hub`` registers the NCL models with timm.
"""
from .models import (
    HUB_ORG, PAPER_MODELS, CosineClassifier, MocoConfig, NCLModel, WeightsUnavailableError, create_model,
)
from . import hub  # noqa: F401  (ncl_hub.hub.save_pretrained / load_model / publish)
from .losses import (
    NCLLoss, balanced_logits, hard_category_mask, moco_loss, nbod_loss, ncl_loss, nil_loss,
)

from .version import __version__

__all__ = [
    "HUB_ORG", "PAPER_MODELS", "CosineClassifier", "MocoConfig", "NCLModel", "WeightsUnavailableError",
    "create_model", "NCLLoss", "balanced_logits", "hard_category_mask", "moco_loss", "nbod_loss", "ncl_loss",
    "nil_loss", "__version__",
]
