"""NCL model family; importing this package registers every model with timm."""
from ..config import MocoConfig
from .moco import MocoBranch
from .ncl import CLASSIFIERS, CosineClassifier, NCLModel, classifier_names
from .factory import (
    HUB_ORG, PAPER_MODELS, CheckpointMismatchError, WeightsUnavailableError, check_trunks_match, create_model,
)
from . import resnet_cifar  # noqa: F401  (registers the CIFAR ResNets)

__all__ = [
    "CLASSIFIERS", "CosineClassifier", "MocoBranch", "MocoConfig", "NCLModel", "classifier_names",
    "HUB_ORG", "PAPER_MODELS", "CheckpointMismatchError", "WeightsUnavailableError", "check_trunks_match",
    "create_model",
]
