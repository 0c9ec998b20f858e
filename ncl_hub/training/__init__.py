"""NCL training with Accelerate: ``build`` makes the model, the objective, the optimizer and the schedule from a
configuration, ``engine`` runs one training step and keeps checkpoints, ``loop`` is ``train()``, the logic behind
``recipes/train.py``."""
from ..data import build_data, build_train_loader  # noqa: F401  (imported from here by benchmarks, tests, study)
from .build import (build_criterion, build_model, build_optimizer, build_scheduler, describe_schedule, lr_factor,
                    needed_warmup_steps)
from .engine import ModelWithLoss, NonFiniteLossError, Progress, StepRunner, find_checkpoint
from .loop import code_version, train

__all__ = [
    "ModelWithLoss", "NonFiniteLossError", "Progress", "StepRunner", "build_criterion", "build_model",
    "build_optimizer", "build_scheduler", "code_version", "describe_schedule", "find_checkpoint", "lr_factor",
    "needed_warmup_steps", "train",
]
