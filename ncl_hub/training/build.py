"""What a training run is made of, built from its configuration: the model, the objective, the optimizer and the
learning-rate schedule (with its description and warnings)."""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import timm
import torch
import torch.nn as nn

from .. import hub
from ..baselines import ExpertCELoss
from ..config import WARMUP_STEPS_DEFAULT, ConfigError, RunConfig, loss_departures
from ..losses import NCLLoss
from ..models import PAPER_MODELS, NCLModel, WeightsUnavailableError, create_model

PAPER_LR = 0.1  # the paper's CIFAR rate (batch 64), at which WARMUP_STEPS_DEFAULT was measured

__all__ = ["build_criterion", "build_model", "build_optimizer", "build_scheduler", "describe_schedule", "lr_factor",
           "needed_warmup_steps"]


# ---------------------------------------------------------------------------------------------- model and loss
def build_model(cfg: RunConfig, num_classes: int, class_names: Optional[List[str]] = None) -> NCLModel:
    """The NCL model of ``cfg.model`` for ``num_classes`` (with the MoCo branch when ``cfg.moco.enabled``),
    initialised from ``cfg.init_from`` when given. Problems (unknown backbone, a mismatched or damaged checkpoint)
    are ConfigErrors."""
    try:
        return _build_model(cfg, num_classes, class_names)
    except (FileNotFoundError, ValueError, WeightsUnavailableError) as e:  # incl. a damaged --init_from file
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model: {e}") from e


def _build_model(cfg: RunConfig, num_classes: int, class_names: Optional[List[str]]) -> NCLModel:
    mc = cfg.model
    if mc.name:
        if not timm.is_model(mc.name) or not mc.name.startswith("ncl"):
            raise ConfigError(f"model.name {mc.name!r} is not a registered NCL model; choose one of "
                              f"{sorted(PAPER_MODELS)} or set model.backbone instead")
        model = timm.create_model(mc.name, num_classes=num_classes, num_experts=mc.num_experts, moco=cfg.moco,
                                  pretrained_backbone=mc.pretrained_backbone, **mc.backbone_kwargs)
    else:
        model = create_model(mc.backbone, num_classes=num_classes, num_experts=mc.num_experts,
                             classifier=mc.classifier, cosine_scale=mc.cosine_scale, moco=cfg.moco,
                             pretrained_backbone=mc.pretrained_backbone, **mc.backbone_kwargs)
    if class_names is not None:
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=tuple(class_names))
    if cfg.init_from:
        hub.init_from(model, cfg.init_from, experts=cfg.init_experts)
    if cfg.freeze_trunks:
        hub.freeze_trunks(model)
    if mc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.set_expert_execution(mc.expert_execution)


def build_criterion(cfg: RunConfig, class_counts: List[int]) -> nn.Module:
    """The training objective named by ``cfg.loss.name`` (ncl | bsce | ce), plus MoCo's term if enabled."""
    con = dict(contrastive_weight=cfg.moco.weight, temperature=cfg.moco.temperature)
    if cfg.loss.name == "ncl":
        return NCLLoss(class_counts, hard_ratio=cfg.loss.hard_ratio, distill_weight=cfg.loss.distill_weight,
                       anchor=cfg.loss.anchor, variant=cfg.loss.variant, validate_targets=False,
                       ramp_steps=cfg.loss.ramp_steps, hard_weight=cfg.loss.hard_weight, **con)
    return ExpertCELoss(class_counts, balanced=cfg.loss.name == "bsce", **con)


# ---------------------------------------------------------------------------------------------- optimizer
def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` over the trainable parameters of ``model``.

    The default is the released NCL's: SGD with Nesterov momentum 0.9 and weight decay on every parameter, biases
    and normalisation layers included (``optim.filter_bias_and_bn=false``; names in a trunk's ``no_weight_decay()``
    never decay, as in timm). ``optim.name`` picks any timm optimizer (``adamw`` for ViT / ConvNeXt trunks), with
    ``filter_bias_and_bn`` and ``layer_decay`` (over the trunks' ``group_matcher``) as timm defines them.
    """
    from timm.optim import create_optimizer_v2

    oc = cfg.optim
    name = oc.name
    if name == "sgd" and not oc.nesterov:
        name = "momentum"  # timm: "sgd" is Nesterov momentum SGD, "momentum" the plain one
    return create_optimizer_v2(model, opt=name, lr=oc.lr, weight_decay=oc.weight_decay, momentum=oc.momentum,
                               filter_bias_and_bn=oc.filter_bias_and_bn, layer_decay=oc.layer_decay)


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, steps_per_epoch: int, cfg: RunConfig) -> float:
    """Multiplier of the peak rate after ``step`` optimizer steps: linear warm-up over ``optim.warmup_steps``,
    then multistep (milestones at fractions of the run's ``steps_per_epoch * epochs`` steps) or cosine."""
    oc = cfg.optim
    total = max(1, steps_per_epoch * cfg.epochs)
    if step < oc.warmup_steps:
        return (step + 1) / oc.warmup_steps
    if oc.schedule == "multistep":
        return oc.gamma ** sum(step >= _milestone_step(m, total) for m in oc.milestones)
    if oc.schedule == "cosine":
        t = min(1.0, (step - oc.warmup_steps) / max(1, total - oc.warmup_steps))
        floor = oc.min_lr / oc.lr if oc.lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    raise ConfigError(f"unknown schedule {oc.schedule!r}; choose multistep or cosine")


def _milestone_step(fraction: float, total_steps: int) -> int:
    return int(round(fraction * total_steps))


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as a scheduler stepped once per optimizer step (``optimizer`` may be Accelerate's
    wrapper)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return torch.optim.lr_scheduler.LambdaLR(inner, lambda s: lr_factor(s, steps_per_epoch, cfg))


def needed_warmup_steps(lr: float) -> int:
    """Warm-up steps NCL needs to start safely at peak rate ``lr``: ``WARMUP_STEPS_DEFAULT`` at the paper's 0.1
    (measured, docs/results.md "Warm-up"), scaled with the rate so that the rate never rises faster per step than
    the measured safe ramp (an extrapolation: only lr 0.1 was measured)."""
    return math.ceil(WARMUP_STEPS_DEFAULT * lr / PAPER_LR)


def describe_schedule(steps_per_epoch: int, cfg: RunConfig) -> List[str]:
    """The resolved schedule in words, and warnings about it (printed when a run starts).

    The warning names the risk: NCL puts two cross-entropies and the distillation on every expert, so at the
    same rate its first steps are larger than a plain loss's; with fewer warm-up steps than
    :func:`needed_warmup_steps` its experts can collapse early (docs/results.md, "Warm-up").
    """
    oc = cfg.optim
    total = steps_per_epoch * cfg.epochs
    lines = [f"schedule: {cfg.epochs} epochs x {steps_per_epoch} optimizer steps = {total} steps; "
             f"warm-up {oc.warmup_steps} steps ({oc.warmup_steps / max(1, steps_per_epoch):.1f} epochs) to lr "
             f"{oc.lr:g}, then " + (
                 "cosine to " + f"{oc.min_lr:g}" if oc.schedule == "cosine" else
                 "x" + f"{oc.gamma:g} at " + ", ".join(
                     f"step {_milestone_step(m, total)} (epoch {_milestone_step(m, total) / steps_per_epoch:.1f})"
                     for m in oc.milestones))]
    if cfg.loss.name == "ncl":
        lines += [f"loss, not in the paper: {d}" for d in loss_departures(dataclasses.asdict(cfg.loss))]
    warnings = []
    needed = needed_warmup_steps(oc.lr)
    if cfg.loss.name == "ncl" and oc.warmup_steps < needed and not cfg.init_from:
        warnings.append(
            f"warning: warm-up of {oc.warmup_steps} optimizer steps is shorter than the {needed} NCL needs at lr "
            f"{oc.lr:g}: its two cross-entropies and the distillation make its first steps about twice a plain "
            "loss's, and its experts can collapse to constant predictions in the first epochs (docs/results.md, "
            f"Warm-up). Use --optim.warmup_steps {needed} or more, or a lower --optim.lr.")
    if oc.warmup_steps > total // 2:
        warnings.append(f"warning: the warm-up ({oc.warmup_steps} steps) is more than half of the run ({total} "
                        "steps): the rate spends most of the run below its peak. Train longer or on more data.")
    return lines + warnings

