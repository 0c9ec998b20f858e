"""NCL training with Accelerate on Hugging Face datasets: the logic behind ``recipes/train.py``.

``train(cfg)`` builds the data (long-tailed resampling, a balanced validation split held out from the
training data), the model, the loss, the optimizer and the schedule; trains with Accelerate (devices,
mixed precision, gradient accumulation, several processes, trackers); checkpoints every epoch with
``accelerator.save_state`` (atomically, keeping the last N) and the best-on-validation model; and at the
end evaluates the best model and writes hub-ready exports.

Run folder (``cfg.output_dir``)::

    config.yaml        the resolved configuration
    run_info.json      class names and counts, selection results, timings, the command
    checkpoints/       epoch_XXXX[_step_YYYYYY]/ accelerator.save_state folders (the last keep_last)
    best/              the best-on-validation ensemble (hub.save_pretrained layout)
    eval/              metrics.json, summary.md, plots
    export/ensemble/   hub-ready ensemble;  export/expert/  the selected single expert
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from .config import ConfigError, RunConfig, config_to_dict, save_config
from .losses import NCLLoss, validate_class_counts
from .models import MocoConfig, NCLModel, create_model

__all__ = ["train", "build_data", "build_model", "build_train_loader", "build_criterion", "lr_factor",
           "describe_schedule",
           "NonFiniteLossError", "find_checkpoint", "DataBundle", "ExpertCELoss"]

_logger = logging.getLogger(__name__)
_BENCHMARKS = ("imagenet_lt", "places_lt", "inat2018")
# compile=null (auto) compiles runs at least this long: on 2 CPU cores the ResNet-32 x 3 + MoCo trunks compile in
# about 2 minutes (cold cache) and then the step runs about 1.5x faster (benchmarks/train_step.py,
# docs/performance.md)
COMPILE_MIN_STEPS = 2000
COMPILE_SCOPES = ("trunks", "step")
_LOSS_TERMS = ("loss", "nil_all", "nil_hard", "nbod_all", "nbod_hard", "ce", "con")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------- losses
class ExpertCELoss(nn.Module):
    """The baselines: cross-entropy per expert, summed over experts; ``balanced`` adds log(class_counts)
    to the logits (Balanced Softmax CE, Ren et al. 2020). Same call signature as NCLLoss."""

    log_prior: torch.Tensor

    def __init__(self, class_counts, *, balanced: bool, contrastive_weight: float = 1.0, temperature: float = 0.2):
        super().__init__()
        counts = validate_class_counts(class_counts)
        self.register_buffer("log_prior", counts.log() if balanced else torch.zeros_like(counts), persistent=False)
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature

    def forward(self, logits, target, query=None, key=None, queue=None, anchor=None) -> Dict[str, torch.Tensor]:
        from .losses import moco_loss

        logp = (logits.float() + self.log_prior).log_softmax(-1)
        ce = -logp.gather(-1, target.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1).mean(-1).sum()
        out = {"ce": ce, "loss": ce}
        if query is not None:
            out["con"] = moco_loss(query, key, queue, self.temperature)
            out["loss"] = ce + self.contrastive_weight * out["con"]
        return out


def build_criterion(cfg: RunConfig, class_counts: List[int]) -> nn.Module:
    """The training objective named by ``cfg.loss.name`` (ncl | bsce | ce), plus MoCo if enabled."""
    name = cfg.loss.name
    con = dict(contrastive_weight=cfg.moco.weight, temperature=cfg.moco.temperature)
    if name == "ncl":
        return NCLLoss(class_counts, hard_ratio=cfg.loss.hard_ratio, distill_weight=cfg.loss.distill_weight,
                       anchor=cfg.loss.anchor, variant=cfg.loss.variant, validate_targets=False,
                       ramp_steps=cfg.loss.ramp_steps, **con)
    if name in ("bsce", "ce"):
        return ExpertCELoss(class_counts, balanced=name == "bsce", **con)
    raise ConfigError(f"unknown loss {name!r}; choose ncl, bsce or ce")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class DataBundle:
    train: Any
    val: Optional[Any]
    test: Optional[Any]
    class_names: List[str]
    class_counts: List[int]
    source: str
    notes: List[str] = field(default_factory=list)  # how train / val were made, printed at start

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _class_names(dataset) -> List[str]:
    feature = dataset.features["label"]
    names = getattr(feature, "names", None)
    if not names:
        raise ConfigError("the label column has no class names (ClassLabel); cannot tell the number of classes")
    return list(names)


def _check_labels(dataset, num_classes: int, split: str) -> None:
    labels = np.asarray(dataset.with_format(None)["label"]) if len(dataset) else np.zeros(0, dtype=np.int64)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{split} labels must be integers, got {labels.dtype}")
    bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"{split} label at index {i} is {int(labels[i])}, outside [0, {num_classes}); "
                          f"{bad.size} label(s) out of range")


def build_data(cfg: RunConfig) -> DataBundle:
    """Load the dataset, make the train split long-tailed, hold out a balanced validation split.

    Every problem with the input (a missing path, no image or label column, bad labels, an empty class)
    is raised as a ConfigError naming it, before any training."""
    try:
        return _build_data(cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data: {e}") from e


def _build_data(cfg: RunConfig) -> DataBundle:
    from . import data as D

    dc = cfg.data
    if dc.dataset in _BENCHMARKS:
        if not dc.benchmark_root:
            raise ConfigError(f"dataset {dc.dataset!r} needs --data.benchmark_root (the folder of its images)")
        splits = dict(D.load_benchmark(dc.dataset, dc.benchmark_root))
        if dc.test_split and dc.test_split != "test" and dc.test_split in splits:  # iNaturalist: val is the test
            splits["test"] = splits.pop(dc.test_split)
    else:
        splits = D.load_image_dataset(dc.dataset, config_name=dc.config_name, train_split=dc.train_split,
                                      test_split=dc.test_split or "test", image_column=dc.image_column,
                                      label_column=dc.label_column)
    train = splits["train"]
    names = _class_names(train)
    _check_labels(train, len(names), dc.train_split)
    if dc.imbalance_factor is not None and dc.imbalance_factor < 1:
        raise ConfigError(f"imbalance_factor must be >= 1, got {dc.imbalance_factor}")
    train, val, notes = _train_and_val(train, splits.get("val") if dc.val_per_class > 0 else None, dc, names)
    if dc.limit_train is not None and dc.limit_train < len(train):
        train = train.shuffle(seed=cfg.seed).select(range(dc.limit_train))
    counts = D.class_counts(train, len(names))
    empty = [i for i, n in enumerate(counts) if n == 0]
    if empty:
        shown = ", ".join(f"{i} ({names[i]})" for i in empty[:10])
        raise ConfigError(f"{len(empty)} class(es) have no training images after long-tailed resampling and the "
                          f"validation hold-out: {shown}. Lower the imbalance factor or --data.val_per_class.")
    test = None
    if dc.test_split and "test" in splits:
        test = splits["test"]
        _check_labels(test, len(names), dc.test_split)
    if dc.limit_eval is not None:
        val = val.select(range(min(dc.limit_eval, len(val)))) if val is not None else None
        test = test.select(range(min(dc.limit_eval, len(test)))) if test is not None else None
    absent = _classes_without_images(test, names) if test is not None else []
    if absent:
        notes.append(f"test: {len(absent)} of {len(names)} classes have no test images: {_name_list(absent)}; "
                     "their accuracy is not measured (many / medium / few average the classes present)")
    return DataBundle(train=train, val=val if val is not None and len(val) else None, test=test,
                      class_names=names, class_counts=counts, source=dc.dataset, notes=notes)


def _classes_without_images(dataset, names: List[str]) -> List[str]:
    from . import data as D

    return [names[c] for c, n in enumerate(D.class_counts(dataset, len(names))) if n == 0]


def _name_list(names: List[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def _record_absent_classes(metrics: Dict[str, Any], split_sets: Dict[str, Any], names: List[str]) -> List[str]:
    """Write ``classes_without_images`` (class names) into every evaluated split of ``metrics``; returns the lines
    that report them."""
    lines = []
    for split, entry in metrics.get("splits", {}).items():
        if split_sets.get(split) is None:
            continue
        absent = _classes_without_images(split_sets[split], names)
        entry["classes_without_images"] = absent
        if absent:
            lines.append(f"{split}: {len(absent)} of {len(names)} classes have no {split} images, so no accuracy: "
                         f"{_name_list(absent)}")
    return lines


def _train_and_val(train, own_val, dc, names: List[str]):
    """The training set and the validation set, by the benchmark's protocol (``DataConfig.val_per_class``):

    1. the dataset's own validation split when it has one (ImageNet-LT, Places-LT, iNaturalist, a Hub dataset
       with a ``validation`` split);
    2. else, when the library makes a balanced split long-tailed, the images the subsampling discards
       (balanced, ``val_per_class`` per class), so the training set is exactly the benchmark's;
    3. else a balanced hold-out from the training images (at most half of each class), reported per class.

    The choice follows ``data.lt_seed``, so every training seed of a study sees the same images.
    Returns ``(train, val or None, notes)``; the notes say where validation came from.
    """
    from . import data as D

    notes: List[str] = []
    make_lt = dc.imbalance_factor is not None
    if make_lt and not D.is_balanced(D.class_counts(train, len(names))):
        notes.append(f"the training split is already long-tailed: data.imbalance_factor={dc.imbalance_factor:g} "
                     "is ignored")
        make_lt = False
    lt_args = dict(profile=dc.lt_profile, seed=dc.lt_seed, n_max=dc.lt_head_size)
    if not make_lt and dc.lt_head_size is not None:
        raise ConfigError("data.lt_head_size needs data.imbalance_factor and a balanced training split")
    if own_val is not None:
        notes.append(f"validation: the dataset's own validation split ({len(own_val)} images)")
        return (D.make_long_tailed(train, dc.imbalance_factor, **lt_args) if make_lt else train), own_val, notes
    if dc.val_per_class == 0:
        return (D.make_long_tailed(train, dc.imbalance_factor, **lt_args) if make_lt else train), None, notes
    if make_lt:
        train, val, val_counts = D.long_tailed_split(train, dc.imbalance_factor, dc.val_per_class, **lt_args)
        notes.append(f"validation: {len(val)} images the long-tail subsampling left out, up to {dc.val_per_class} "
                     "per class; the training set is the benchmark's")
        short = [f"{names[c]} {n}" for c, n in enumerate(val_counts) if n < dc.val_per_class]
        if short:
            notes.append("classes with fewer validation images (they keep every image for training; validation "
                         f"accuracy averages the classes it has): {', '.join(short)}")
        return train, val, notes
    before = D.class_counts(train, len(names))
    train, val = D.split_validation(train, per_class=dc.val_per_class, seed=dc.lt_seed)
    taken = D.class_counts(val, len(names))
    notes.append(f"validation: {len(val)} images held out of the training split (no validation split, nothing "
                 "discarded to take them from); per class taken / had: "
                 + ", ".join(f"{names[c]} {t}/{n}" for c, (t, n) in enumerate(zip(taken, before))))
    return train, val, notes


class EpochSeededDataset(torch.utils.data.Dataset):
    """Seeds the augmentation of sample i in epoch e from (seed, e, i): the pipeline is then the same
    whatever the number of workers, and a resumed run sees exactly the images an uninterrupted one saw.
    The caller's RNG state is restored after each sample (it may run in the main process)."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state[0]))
            random.seed(int(state[1]))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: RunConfig, num_classes: int, class_names: Optional[List[str]] = None) -> NCLModel:
    """The NCL model of ``cfg.model`` for ``num_classes`` (with the MoCo branch when enabled), initialised
    from ``cfg.init_from`` when given. Problems (unknown backbone, a mismatched checkpoint) are ConfigErrors."""
    from .models import WeightsUnavailableError

    try:
        return _build_model(cfg, num_classes, class_names)
    except (FileNotFoundError, ValueError, WeightsUnavailableError) as e:  # incl. a damaged --init_from file
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model: {e}") from e


def _build_model(cfg: RunConfig, num_classes: int, class_names: Optional[List[str]] = None) -> NCLModel:
    import timm

    mc = cfg.model
    moco = None
    if cfg.moco.enabled:
        moco = MocoConfig(dim=cfg.moco.dim, hidden_dim=cfg.moco.hidden_dim, queue_size=cfg.moco.queue_size,
                          temperature=cfg.moco.temperature, momentum=cfg.moco.momentum)
    if mc.num_experts < 1:
        raise ConfigError(f"model.num_experts must be >= 1, got {mc.num_experts}")
    if mc.expert_execution == "batched" and mc.grad_checkpointing:
        raise ConfigError("model.expert_execution=batched does not combine with model.grad_checkpointing; "
                          "turn one of them off")
    if mc.name:
        if not timm.is_model(mc.name) or not mc.name.startswith("ncl"):
            from .models import PAPER_MODELS

            raise ConfigError(f"model.name {mc.name!r} is not a registered NCL model; choose one of "
                              f"{sorted(PAPER_MODELS)} or set model.backbone instead")
        model = timm.create_model(mc.name, num_classes=num_classes, num_experts=mc.num_experts, moco=moco,
                                  pretrained_backbone=mc.pretrained_backbone, **mc.backbone_kwargs)
    else:
        model = create_model(mc.backbone, num_classes=num_classes, num_experts=mc.num_experts,
                             classifier=mc.classifier, cosine_scale=mc.cosine_scale, moco=moco,
                             pretrained_backbone=mc.pretrained_backbone, **mc.backbone_kwargs)
    if class_names is not None:
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=tuple(class_names))
    if cfg.init_from:
        from . import hub

        hub.init_from(model, cfg.init_from, experts=cfg.init_experts)
    if cfg.freeze_trunks:
        from . import hub

        hub.freeze_trunks(model)
    if mc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.set_expert_execution(mc.expert_execution)
    return model


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


def describe_schedule(steps_per_epoch: int, cfg: RunConfig) -> List[str]:
    """The resolved schedule in words, and warnings about it (printed when a run starts).

    The warning names the risk: NCL puts two cross-entropies and the distillation on every expert, so at the
    same rate its first steps are larger than a plain loss's; with fewer warm-up steps than
    ``WARMUP_STEPS_DEFAULT`` its experts can collapse early (docs/results.md, "Warm-up").
    """
    from .config import WARMUP_STEPS_DEFAULT

    oc = cfg.optim
    total = steps_per_epoch * cfg.epochs
    lines = [f"schedule: {cfg.epochs} epochs x {steps_per_epoch} optimizer steps = {total} steps; "
             f"warm-up {oc.warmup_steps} steps ({oc.warmup_steps / max(1, steps_per_epoch):.1f} epochs) to lr "
             f"{oc.lr:g}, then " + (
                 "cosine to " + f"{oc.min_lr:g}" if oc.schedule == "cosine" else
                 "x" + f"{oc.gamma:g} at " + ", ".join(
                     f"step {_milestone_step(m, total)} (epoch {_milestone_step(m, total) / steps_per_epoch:.1f})"
                     for m in oc.milestones))]
    if cfg.loss.name == "ncl" and cfg.loss.ramp_steps:
        lines.append(f"loss: hard-category and distillation terms ramped in over {cfg.loss.ramp_steps} steps")
    warnings = []
    if cfg.loss.name == "ncl" and oc.warmup_steps < WARMUP_STEPS_DEFAULT and not cfg.init_from:
        warnings.append(
            f"warning: warm-up of {oc.warmup_steps} optimizer steps is shorter than the {WARMUP_STEPS_DEFAULT} NCL "
            "needs at the paper's rate: its experts can collapse in the first epochs (docs/results.md, Warm-up). "
            f"Use --optim.warmup_steps {WARMUP_STEPS_DEFAULT} or more, or a lower --optim.lr.")
    if oc.warmup_steps > total // 2:
        warnings.append(f"warning: the warm-up ({oc.warmup_steps} steps) is more than half of the run ({total} "
                        "steps): the rate spends most of the run below its peak. Train longer or on more data.")
    return lines + warnings


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Progress:
    """Where the run is; saved as progress.json in every checkpoint (plain JSON: nothing is unpickled)."""

    epoch: int = 0  # current epoch (0-based)
    batches_done: int = 0  # micro-batches of the current epoch already trained on this process
    global_step: int = 0  # optimizer steps so far
    best_metric: float = -1.0
    best_epoch: int = -1
    selected_expert: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    partial_sums: List[float] = field(default_factory=list)  # loss sums of the current epoch so far



def _checkpoint_dirs(output_dir: Path) -> List[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp"):
            _logger.warning("skipping incomplete checkpoint %s (an interrupted save)", p)
        elif p.is_dir() and (p / "progress.json").is_file():
            done.append(p)
    return sorted(done, key=_checkpoint_step)


def _checkpoint_step(folder: Path) -> int:
    from . import files

    try:
        return int(files.read_json(folder / "progress.json", fix=f"Delete the checkpoint folder {folder}: --resume "
                                   "then continues from the previous checkpoint.")["global_step"])
    except (files.DamagedFileError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"checkpoint {folder}: {e}") from e


def find_checkpoint(output_dir: Path, resume: str) -> Optional[Path]:
    """``latest`` -> the newest complete checkpoint of ``output_dir`` (None if there is none yet: the run
    starts from the beginning); otherwise the given folder, which must be complete. Every file of the checkpoint
    is checked (a truncated, empty or foreign file is a ConfigError naming it), before anything is written."""
    from . import files

    if resume == "latest":
        found = _checkpoint_dirs(output_dir)
        path = found[-1] if found else None
    else:
        path = Path(resume)
        if not (path / "progress.json").is_file():
            raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no progress.json)")
    if path is not None:
        try:
            files.check_checkpoint_folder(path)
        except files.DamagedFileError as e:
            raise ConfigError(f"--resume: {e}") from e
    return path


def _save_checkpoint(accelerator, output_dir: Path, progress: Progress, scheduler, keep_last: int, tag: str) -> Path:
    """accelerator.save_state (model as safetensors, optimizer and RNG states) plus progress and schedule as JSON,
    into a temporary folder, then an atomic rename: a kill during the save never damages an earlier checkpoint.
    Prunes all but the last ``keep_last`` checkpoints."""
    root = output_dir / "checkpoints"
    final = root / tag
    tmp = root / f".tmp-{tag}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (tmp / "progress.json").write_text(json.dumps(progress.__dict__))  # written last: marks completeness
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        epochs = [p for p in _checkpoint_dirs(output_dir)]
        for old in epochs[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------- the step
class TrainStep(nn.Module):
    """The model plus its loss as one module: what Accelerate prepares (DDP wraps this forward) and what
    ``torch.compile`` compiles. Returns the loss terms and the MoCo keys to enqueue."""

    def __init__(self, model: NCLModel, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion
        # compiled stand-ins for the trunks (plain lists: not registered, so state dicts and exports are unchanged)
        self._trunk_fns: Optional[list] = None
        self._key_trunk_fns: Optional[list] = None

    def compile_trunks(self) -> None:
        """``torch.compile`` each query and key trunk for the training forward (heads, projections and losses
        stay eager). The trunks hold nearly all the compute, and compiling them one by one keeps the compiler's
        memory at one trunk's graph instead of the whole step's (docs/performance.md). The modules themselves
        are untouched: evaluation and exports use them as they are."""
        self._trunk_fns = [torch.compile(t) for t in self.model.trunks]
        if self.model.moco is not None:
            self._key_trunk_fns = [torch.compile(t) for t in self.model.moco.key_trunks]

    def forward(self, x: torch.Tensor, target: torch.Tensor, x_key: Optional[torch.Tensor] = None,
                anchor: Optional[torch.Tensor] = None):
        out = self.model.forward_train(x, x_key, trunks=self._trunk_fns, key_trunks=self._key_trunk_fns)
        losses = self.criterion(out["logits"], target, out.get("query"), out.get("key"), out.get("queue"),
                                anchor=anchor)
        return losses, out.get("key")


class StepRunner:
    """One training micro-step, the same for ``train`` and ``benchmarks/train_step.py``: forward and loss
    (compiled with ``torch.compile`` when asked), backward, and on each optimizer step the update, the
    schedule and the fused momentum update of the key encoders; then the MoCo keys gathered from every
    process are enqueued. No host sync: the random anchor expert is drawn from the CPU generator and passed
    to the (possibly compiled) graph as a tensor.

    Args:
        accelerator: the run's Accelerator.
        step_module: the prepared :class:`TrainStep`.
        optimizer: the prepared optimizer.
        scheduler: an LR scheduler stepped once per optimizer step (or None).
        compile: ``torch.compile`` the training forward. ``compile_scope="trunks"`` (default) compiles each
            trunk and key trunk on its own; ``"step"`` compiles the whole forward and loss as one graph (the
            same speed on a CPU, but the compiler's peak memory grows with K; batched expert execution always
            uses ``"step"``).
        clip_grad_norm: optional gradient-norm clipping.
    """

    def __init__(self, accelerator, step_module: nn.Module, optimizer, scheduler=None, *, compile: bool = False,
                 compile_scope: str = "trunks", clip_grad_norm: Optional[float] = None):
        self.accelerator = accelerator
        self.step_module = step_module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clip_grad_norm = clip_grad_norm
        inner = _unwrap(step_module)
        self.model: NCLModel = inner.model
        self.criterion = inner.criterion
        self.steps_done = 0  # optimizer steps, when there is no scheduler to count them
        self.random_anchor = getattr(inner.criterion, "anchor", 0) is None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        self.forward = step_module
        if compile and (compile_scope == "step" or self.model.expert_execution == "batched"):
            self.forward = torch.compile(step_module)
        elif compile:
            inner.compile_trunks()

    def __call__(self, x: torch.Tensor, target: torch.Tensor, x_key: Optional[torch.Tensor] = None):
        """Returns (loss terms dict, whether an optimizer step happened)."""
        acc = self.accelerator
        anchor = torch.randint(self.model.num_experts, (1,)) if self.random_anchor else None
        if hasattr(self.criterion, "set_step"):
            self.criterion.set_step(self.scheduler.last_epoch if self.scheduler is not None else self.steps_done)
        with acc.accumulate(self.step_module):
            losses, keys = self.forward(x, target, x_key, anchor)
            acc.backward(losses["loss"])  # divided by grad_accum inside
            if acc.sync_gradients and self.clip_grad_norm:
                acc.clip_grad_norm_(self.params, self.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if keys is not None:
            # every process enqueues the keys of all processes: the queues stay identical
            self.model.moco.enqueue(acc.gather(keys.detach().transpose(0, 1).contiguous()).transpose(0, 1))
        if acc.sync_gradients:
            self.steps_done += 1
            if self.scheduler is not None:
                self.scheduler.step()
            self.model.momentum_update()
        return losses, acc.sync_gradients


def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or getattr(module, "_orig_mod")
    return module


def _check_output_dir(cfg: RunConfig, output_dir: Path) -> None:
    holds_run = (output_dir / "config.yaml").exists() or (output_dir / "checkpoints").exists()
    if holds_run and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"output folder {output_dir} holds another run; pass --resume to continue it, "
                          f"--overwrite to replace it, or choose another --output_dir")


def _validate(cfg: RunConfig, num_processes: int) -> int:
    """Checks that need no data; returns the per-process micro-batch size."""
    _validate_options(cfg)
    per_step = num_processes * cfg.grad_accum
    if cfg.data.batch_size < per_step:
        raise ConfigError(f"batch_size {cfg.data.batch_size} is smaller than processes x grad_accum = {per_step}: "
                          "every process needs at least one image per micro-batch")
    if cfg.data.batch_size % per_step:
        raise ConfigError(f"batch_size {cfg.data.batch_size} must be divisible by processes x grad_accum = "
                          f"{per_step} so that the effective batch is exactly batch_size")
    return cfg.data.batch_size // per_step


def _validate_options(cfg: RunConfig) -> None:
    """Option checks that need neither data nor processes (run before Accelerate starts)."""
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {cfg.epochs}")
    if not 0 < cfg.loss.hard_ratio < 1:
        raise ConfigError(f"loss.hard_ratio must be in (0, 1), got {cfg.loss.hard_ratio}")
    if cfg.loss.variant not in ("paper", "official"):
        raise ConfigError(f"loss.variant must be paper or official, got {cfg.loss.variant!r}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
    if cfg.data.on_decode_error not in ("raise", "skip"):
        raise ConfigError(f"data.on_decode_error must be raise or skip, got {cfg.data.on_decode_error!r}")
    if cfg.data.val_per_class < 0:
        raise ConfigError(f"data.val_per_class must be >= 0, got {cfg.data.val_per_class}")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.loss.ramp_steps < 0:
        raise ConfigError(f"loss.ramp_steps must be >= 0, got {cfg.loss.ramp_steps}")
    bad = [m for m in cfg.optim.milestones if not 0 < m <= 1]
    if bad:
        raise ConfigError(f"optim.milestones are fractions of the run in (0, 1] (the paper's 320 and 360 of 400 "
                          f"epochs are 0.8 and 0.9), got {bad}")
    if cfg.moco.enabled and cfg.moco.queue_size < 1:
        raise ConfigError("moco.queue_size must be >= 1")
    for name, valid in (("data.sampler", ("instance", "class", "sqrt", "progressive")),
                        ("optim.schedule", ("multistep", "cosine")), ("loss.name", ("ncl", "bsce", "ce"))):
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in valid:
            raise ConfigError(f"{name} must be one of {', '.join(valid)}, got {value!r}")


# ---------------------------------------------------------------------------------------------- data loading
def _loader_kwargs(cfg: RunConfig) -> Dict[str, Any]:
    return dict(num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=False)


def build_train_loader(cfg: RunConfig, data: DataBundle, model: NCLModel, micro_batch: int):
    """The training DataLoader (before ``accelerator.prepare``): decoding, the ``cfg.data.augment`` policy and,
    with MoCo, the key view, all in the loader workers; per-sample seeds that follow the epoch; the configured
    sampler. ``recipes/train.py`` and ``benchmarks/data.py`` both use it."""
    from . import samplers as S
    from . import transforms as T

    pcfg = model.pretrained_cfg
    train_tf = T.build_train_transform(cfg.data.augment, pcfg)
    key_tf = T.moco_key_transform(pcfg["input_size"], pcfg["mean"], pcfg["std"]) if model.moco is not None else None
    train_set = EpochSeededDataset(
        T.TransformedImageDataset(data.train, train_tf, key_transform=key_tf, on_decode_error=cfg.data.on_decode_error),
        seed=cfg.seed)
    labels = data.train.with_format(None)["label"]
    sampler = S.build_sampler(cfg.data.sampler, labels, num_classes=data.num_classes, seed=cfg.seed,
                              num_epochs=cfg.epochs)
    return torch.utils.data.DataLoader(
        train_set, batch_size=micro_batch, sampler=sampler, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed), **_loader_kwargs(cfg))


# ---------------------------------------------------------------------------------------------- train
def _reset_accelerator_state() -> None:
    """Let one Python process run ``train`` several times (a notebook, the test suite) with different precision.

    Accelerate keeps its state in a process-wide singleton that refuses a second ``mixed_precision``; each run
    starts from a clean ``AcceleratorState``. The process group (``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)


def train(cfg: RunConfig, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train, select on validation, evaluate and export. Returns the final metrics and paths.

    Accelerate's process-wide state (precision, accumulation) is fresh at the start and cleared at the end, so
    a run leaves nothing behind for later code in the same process (the process group is kept).
    """
    _reset_accelerator_state()
    try:
        return _train(cfg, argv)
    finally:
        _reset_accelerator_state()


def _train(cfg: RunConfig, argv: Optional[List[str]]) -> Dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from . import evaluate as E
    from . import hub
    from . import transforms as T

    t_start = time.time()
    output_dir = Path(cfg.output_dir)
    _validate_options(cfg)
    _check_output_dir(cfg, output_dir)
    ckpt = find_checkpoint(output_dir, cfg.resume) if cfg.resume else None  # checked before anything is written
    accelerator = Accelerator(
        cpu=_cpu_multiprocess(),
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, log_with=cfg.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    micro_batch = _validate(cfg, accelerator.num_processes)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    set_seed(cfg.seed)

    data = build_data(cfg)
    if len(data.train) < cfg.data.batch_size:
        raise ConfigError(f"the training split ({len(data.train)} images) is smaller than one batch "
                          f"({cfg.data.batch_size}); lower --data.batch_size")
    model = build_model(cfg, data.num_classes, data.class_names)
    criterion = build_criterion(cfg, data.class_counts)
    if cfg.overwrite and accelerator.is_main_process and not cfg.resume:
        for sub in ("checkpoints", "best", "eval", "export", "logs"):
            shutil.rmtree(output_dir / sub, ignore_errors=True)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None:  # a resumed run's config.yaml is rewritten once its checkpoint has loaded
            save_config(cfg, output_dir / "config.yaml")
    n_max, n_min = max(data.class_counts), min(data.class_counts)
    accelerator.print(
        f"data: {data.source} | {data.num_classes} classes | train {len(data.train)} images "
        f"(max {n_max}, min {n_min}, IF {n_max / n_min:.1f}) "
        f"| val {len(data.val) if data.val is not None else 0} | test {len(data.test) if data.test is not None else 0}")
    for note in data.notes:
        accelerator.print(f"data: {note}")
    n_params = model.num_inference_params()
    accelerator.print(f"model: {model.num_experts} x {model.backbone} ({model.classifier} heads), "
                      f"{n_params / 1e6:.2f}M inference parameters, loss {cfg.loss.name}"
                      f"{' + MoCo' if model.moco is not None else ''}")

    # data pipeline: decoding and augmentation in the loader workers
    train_loader = build_train_loader(cfg, data, model, micro_batch)
    train_set, sampler = train_loader.dataset, train_loader.sampler  # epoch-aware: set each epoch below
    eval_tf = T.eval_transform(model.pretrained_cfg)
    eval_loaders = {}
    for name, ds in (("val", data.val), ("test", data.test)):
        if ds is not None:
            eval_loaders[name] = torch.utils.data.DataLoader(
                T.TransformedImageDataset(ds, eval_tf, on_decode_error=cfg.data.on_decode_error),
                batch_size=cfg.data.eval_batch_size, shuffle=False, **_loader_kwargs(cfg))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                                weight_decay=cfg.optim.weight_decay)
    step_module = TrainStep(model, criterion)
    step_module, optimizer, train_loader = accelerator.prepare(step_module, optimizer, train_loader)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        lambda s: lr_factor(s, steps_per_epoch, cfg))
    progress = Progress()
    unwrapped: NCLModel = _unwrap(step_module).model
    use_compile = cfg.compile if cfg.compile is not None else steps_per_epoch * cfg.epochs >= COMPILE_MIN_STEPS
    run_step = StepRunner(accelerator, step_module, optimizer, scheduler, compile=use_compile,
                          clip_grad_norm=cfg.optim.clip_grad_norm)
    accelerator.print(f"step: {'torch.compile' if use_compile else 'eager'} ({steps_per_epoch} optimizer steps per "
                      f"epoch of {cfg.data.batch_size} images, {accelerator.num_processes} process(es), "
                      f"{accelerator.mixed_precision} mixed precision)")
    for line in describe_schedule(steps_per_epoch, cfg):
        accelerator.print(line)

    if ckpt is not None:
        # model from safetensors; optimizer and RNG states with torch.load(weights_only=True); the rest is JSON
        try:
            accelerator.load_state(str(ckpt))
        except (RuntimeError, ValueError, KeyError) as e:  # another model or optimizer than the one saved
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"--resume: checkpoint {ckpt} does not fit this run ({type(e).__name__}: {first}). It was saved by "
                f"another model or optimizer setup: resume with the run's own config.yaml "
                f"(--config {output_dir / 'config.yaml'}), or start a new run in another --output_dir.") from e
        if accelerator.is_main_process:
            save_config(cfg, output_dir / "config.yaml")
        progress.__dict__.update(json.loads((ckpt / "progress.json").read_text()))
        scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
        accelerator.print(f"resumed from {ckpt}: epoch {progress.epoch + 1}, step {progress.global_step}")
    elif cfg.resume:
        accelerator.print(f"--resume: no complete checkpoint under {output_dir / 'checkpoints'} yet; starting at "
                          "the beginning")
    if cfg.log_with:
        accelerator.init_trackers("ncl", config=_flat_config(cfg))

    images_per_step = micro_batch * accelerator.num_processes * cfg.grad_accum
    log_every = max(1, cfg.log_every)
    for epoch in range(progress.epoch, cfg.epochs):
        progress.epoch = epoch
        train_set.epoch = epoch
        sampler.set_epoch(epoch)
        step_module.train()
        skip = progress.batches_done
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        steps_left = steps_per_epoch - skip // cfg.grad_accum
        bar = tqdm(total=steps_per_epoch, initial=skip // cfg.grad_accum, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   # no bar in a log file (a study's train.log): the epoch lines say the same
                   disable=not accelerator.is_local_main_process or not sys.stderr.isatty(), leave=False,
                   dynamic_ncols=True)
        window = torch.zeros(log_every, len(_LOSS_TERMS), device=accelerator.device)
        sums = torch.tensor(progress.partial_sums if skip and progress.partial_sums else [0.0] * len(_LOSS_TERMS),
                            device=accelerator.device)
        t_epoch, n_steps, t_window = time.time(), 0, time.time()
        for batch in loader:
            losses, stepped = run_step(batch["pixel_values"], batch["label"], batch.get("key_values"))
            progress.batches_done += 1
            if not stepped:
                continue
            row = torch.stack([losses.get(k, sums.new_zeros(())).detach().float() for k in _LOSS_TERMS])
            window[progress.global_step % log_every] = row
            sums += row
            progress.global_step += 1
            n_steps += 1
            bar.update(1)
            if progress.global_step % log_every == 0 or n_steps == steps_left:
                _check_finite(window, progress.global_step, min(log_every, n_steps))
                if accelerator.is_local_main_process:
                    rate = images_per_step * ((n_steps - 1) % log_every + 1) / max(1e-9, time.time() - t_window)
                    bar.set_postfix(loss=f"{window[(progress.global_step - 1) % log_every, 0].item():.3f}",
                                    img_s=f"{rate:.0f}", lr=f"{scheduler.get_last_lr()[0]:.4g}")
                t_window = time.time()
                if cfg.log_with:
                    accelerator.log({f"train/{k}": v for k, v in zip(_LOSS_TERMS, window[
                        (progress.global_step - 1) % log_every].tolist())} | {"lr": scheduler.get_last_lr()[0]},
                        step=progress.global_step)
            if cfg.save_every_steps and progress.global_step % cfg.save_every_steps == 0 and n_steps < steps_left:
                _check_finite(window, progress.global_step, min(log_every, n_steps))
                progress.partial_sums = sums.tolist()
                _save_checkpoint(accelerator, output_dir, progress, scheduler, cfg.keep_last,
                                 f"epoch_{epoch:04d}_step_{progress.global_step:07d}")
            if n_steps >= steps_left:
                break
        bar.close()
        _check_finite(window, progress.global_step, min(log_every, n_steps))
        elapsed = time.time() - t_epoch
        epoch_steps = skip // cfg.grad_accum + n_steps
        means = {k: v for k, v in zip(_LOSS_TERMS, (sums / max(1, epoch_steps)).tolist()) if v != 0.0}
        record = {"epoch": epoch + 1, "step": progress.global_step, "lr": scheduler.get_last_lr()[0],
                  "time_s": round(elapsed, 2), "images_per_s": round(images_per_step * n_steps / max(elapsed, 1e-9), 1),
                  **{f"train_{k}": round(v, 4) for k, v in means.items()}}
        skipped = train_set.dataset.skipped
        if skipped:
            record["skipped_images"] = len(skipped)
            accelerator.print(f"warning: {len(skipped)} training image(s) could not be decoded and were skipped "
                              f"(data.on_decode_error=skip); first indices {skipped[:10]}")
        if "val" in eval_loaders:
            logits, target = E.predict(unwrapped, eval_loaders["val"], accelerator)
            val = E.split_metrics(logits, target, data.class_counts, test_imbalances=())  # selection: top-1 only
            record["val_top1"] = val["ensemble"]["top1"]
            record["val_expert_top1"] = [e["top1"] for e in val["experts"]]
            if val["ensemble"]["top1"] > progress.best_metric:
                progress.best_metric, progress.best_epoch = val["ensemble"]["top1"], epoch + 1
                progress.selected_expert = int(val["best_expert"])
                _save_best(accelerator, unwrapped, output_dir, cfg, data)
        else:  # no validation split: the last epoch is the model, expert 0 the single expert
            progress.best_epoch, progress.selected_expert = epoch + 1, 0
            _save_best(accelerator, unwrapped, output_dir, cfg, data)
        progress.history.append(record)
        accelerator.print(_epoch_line(record, progress))
        if cfg.log_with:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=progress.global_step)
        progress.epoch, progress.batches_done, progress.partial_sums = epoch + 1, 0, []
        _save_checkpoint(accelerator, output_dir, progress, scheduler, cfg.keep_last, f"epoch_{epoch:04d}")

    # final: the best model on every evaluation split, then exports
    accelerator.wait_for_everyone()
    best = hub.load_model(f"local-dir:{output_dir / 'best'}")
    best.to(accelerator.device)
    predictions = {}
    for name in cfg.eval_splits:
        if name in eval_loaders:
            predictions[name] = E.predict(best, eval_loaders[name], accelerator)
    selected = progress.selected_expert
    metrics = E.evaluate_predictions(predictions, data.class_counts, selected_expert=selected)
    for line in _record_absent_classes(metrics, {"val": data.val, "test": data.test}, data.class_names):
        accelerator.print(line)
    result: Dict[str, Any] = {"metrics": metrics, "output_dir": str(output_dir), "best_epoch": progress.best_epoch,
                              "selected_expert": selected, "history": progress.history}
    if accelerator.is_main_process:
        report = E.write_report(metrics, output_dir / "eval", title=f"NCL on {data.source}")
        run_info = {
            "class_names": data.class_names, "class_counts": data.class_counts, "dataset": data.source,
            "imbalance_factor": cfg.data.imbalance_factor, "command": _command(argv),
            "best_epoch": progress.best_epoch, "selected_expert": selected, "epochs": cfg.epochs,
            "wall_time_s": round(time.time() - t_start, 1), "num_processes": accelerator.num_processes,
            "commit": code_version(),
            "history": progress.history, "skipped_train_images": train_set.dataset.skipped,
        }
        _write_json_atomic(output_dir / "run_info.json", run_info)
        common = dict(metrics=metrics, config=config_to_dict(cfg), class_names=data.class_names,
                      class_counts=data.class_counts, plots_dir=output_dir / "eval", command=run_info["command"],
                      run_info=run_info)
        hub.save_pretrained(best, output_dir / "export" / "ensemble", variant="ensemble", **common)
        hub.save_pretrained(best, output_dir / "export" / "expert", variant="expert", expert_index=selected, **common)
        result["report"] = {k: str(v) for k, v in report.items()}
        accelerator.print(E.format_summary(metrics, title=f"NCL on {data.source}"))
        accelerator.print(f"wrote {output_dir / 'export'} (ensemble, and expert {selected} chosen on "
                          f"{'validation' if data.val is not None else 'nothing: no validation split'}) "
                          f"in {time.time() - t_start:.0f}s")
        if cfg.push_to_hub:
            result["hub"] = hub.publish(output_dir, cfg.push_to_hub, private=cfg.hub_private)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def code_version() -> str:
    """The git commit of the ncl_hub code that runs (``-dirty`` with uncommitted changes to tracked files), or the
    package version outside a git checkout: recorded with every run."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from . import __version__

        return f"ncl-hub {__version__}"


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _cpu_multiprocess() -> bool:
    """torchrun/accelerate launched several processes on a machine without a GPU: Accelerate only picks
    gloo CPU data parallelism when told ``cpu=True``."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _save_best(accelerator, model: NCLModel, output_dir: Path, cfg: RunConfig, data: DataBundle) -> None:
    from . import hub

    if accelerator.is_main_process:
        hub.save_pretrained(model, output_dir / "best", variant="ensemble", config=config_to_dict(cfg),
                            class_names=data.class_names, class_counts=data.class_counts)
    accelerator.wait_for_everyone()


def _check_finite(window: torch.Tensor, global_step: int, n: int) -> None:
    """Raise NonFiniteLossError naming the first bad step and term among the last ``n`` steps (one sync)."""
    if bool(torch.isfinite(window).all()):
        return
    rows = window.shape[0]
    for back in range(n - 1, -1, -1):
        step = global_step - back
        row = window[(step - 1) % rows]
        bad = [f"{k}={v}" for k, v in zip(_LOSS_TERMS, row.tolist()) if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {step}: {', '.join(bad)}. "
                "The run stopped; the last good checkpoint is kept. Lower the learning rate, check the data, "
                "or try --mixed_precision no.")


def _epoch_line(record: Dict[str, Any], progress: Progress) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record.get('train_loss', float('nan')):.4f}"]
    for k in ("nil_all", "nil_hard", "nbod_all", "nbod_hard", "ce", "con"):
        if f"train_{k}" in record:
            parts.append(f"{k} {record[f'train_{k}']:.4f}")
    if "val_top1" in record:
        parts.append(f"val {record['val_top1']:.2f} (best {progress.best_metric:.2f} @ {progress.best_epoch})")
    parts += [f"lr {record['lr']:.4g}", f"{record['images_per_s']:.0f} img/s", f"{record['time_s']:.1f}s"]
    return " | ".join(parts)


def _flat_config(cfg: RunConfig) -> Dict[str, Any]:
    out = {}
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        else:
            out[section] = values if isinstance(values, (int, float, str, bool)) else str(values)
    return out


def _command(argv: Optional[List[str]]) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python recipes/train.py", *args]).strip()



# ---------------------------------------------------------------------------------------------- evaluate
def evaluate_run(path, *, splits: Optional[List[str]] = None, out_dir=None, overrides: Optional[Dict[str, str]] = None,
                 batch_size: Optional[int] = None, class_prior: Optional[str] = None,
                 prior_strength: Optional[float] = None) -> Dict[str, Any]:
    """Evaluate a training output folder (its best/ model) or an export folder on any split.

    The data are rebuilt from the run's saved configuration (the same seeded long-tailed split and
    validation hold-out), overridable with ``overrides`` (``{"data.dataset": ...}``); the class counts
    are those saved with the run (the counts the model was trained on).

    ``class_prior`` evaluates the model deployed with a class prior (``NCLModel.set_class_prior``): ``"train"``,
    ``"uniform"`` or a file of C numbers (``priors.load_prior_file``); None keeps the one saved with the model (if
    any). ``prior_strength``: its tau (None: the model's). The model runs once, without prior: the metrics add the
    prior to the stored logits, and so do the prior-shift numbers for each test prior.
    """
    from accelerate import Accelerator

    from . import evaluate as E
    from . import transforms as T
    from .config import apply_overrides, config_from_dict, load_config

    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "best").is_dir():
        cfg, model_dir = load_config(path / "config.yaml"), path / "best"
    elif (path / "config.json").is_file():
        model_dir = path
        saved = path / "training_config.yaml"
        cfg = config_from_dict(_read_yaml(saved)) if saved.is_file() else RunConfig()
    else:
        raise ConfigError(f"{path} is neither a training output folder (config.yaml + best/) nor an export "
                          "folder (config.json)")
    if overrides:
        apply_overrides(cfg, overrides, from_cli=True, source="command line")
    info = _read_run_json(model_dir / "config.json")
    ncl_info = info.get("ncl", {})
    model = _load_for_evaluation(model_dir)
    data = build_data(cfg)
    counts = ncl_info.get("class_counts") or data.class_counts
    prior, strength = _evaluation_prior(model, class_prior, prior_strength, counts)
    model.set_class_prior(None)  # raw logits; evaluate_predictions adds the prior
    run_info = path / "run_info.json"
    selected = _read_run_json(run_info).get("selected_expert") if run_info.is_file() else None
    if model.num_experts == 1:
        selected = 0
    accelerator = Accelerator()
    model.to(accelerator.device)
    eval_tf = T.eval_transform(model.pretrained_cfg)
    available = {"train": data.train, "val": data.val, "test": data.test}
    splits = list(splits or ["test"])
    predictions = {}
    for name in splits:
        ds = available.get(name)
        if ds is None:
            have = [k for k, v in available.items() if v is not None]
            raise ConfigError(f"split {name!r} is not available; have {have}")
        loader = torch.utils.data.DataLoader(
            T.TransformedImageDataset(ds, eval_tf, on_decode_error=cfg.data.on_decode_error),
            batch_size=batch_size or cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers)
        predictions[name] = E.predict(model, accelerator.prepare(loader), accelerator)
    metrics = E.evaluate_predictions(predictions, counts, selected_expert=selected, class_prior=prior,
                                     prior_strength=strength)
    for line in _record_absent_classes(metrics, available, data.class_names):
        accelerator.print(line)
    out = Path(out_dir) if out_dir else path / f"eval_{'_'.join(splits)}"
    if accelerator.is_main_process:
        E.write_report(metrics, out, title=f"NCL evaluation of {path.name}")
        accelerator.print(E.format_summary(metrics, title=f"NCL evaluation of {path.name}"))
        accelerator.print(f"wrote {out}")
    return metrics


def _evaluation_prior(model: NCLModel, class_prior: Optional[str], prior_strength: Optional[float],
                      class_counts: List[int]):
    """(prior, tau) that evaluate_run deploys the model with, checked before any image is read."""
    from .priors import check_prior_strength, load_prior_file, resolve_prior

    prior = model.class_prior if class_prior is None else class_prior
    strength = model.prior_strength if prior_strength is None else prior_strength
    try:
        if isinstance(prior, str) and prior not in ("train", "uniform"):
            prior = load_prior_file(prior)
        resolve_prior(prior, model.num_classes, class_counts)
        check_prior_strength(strength)
    except ValueError as e:
        raise ConfigError(f"--class-prior / --prior-strength: {e}") from e
    return prior, strength


def _read_run_json(path: Path) -> Dict[str, Any]:
    """A JSON file of a run or export; a damaged one is a ConfigError naming it."""
    from . import files

    try:
        return files.read_json(path, fix="Copy the folder again, or re-run the export / training that wrote it.")
    except files.DamagedFileError as e:
        raise ConfigError(str(e)) from e


def _read_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML ({e}); copy it again from the run, or delete it to evaluate "
                          "with the default data settings and --data.* options") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping, got {type(data).__name__}")
    return data


def _load_for_evaluation(model_dir: Path) -> NCLModel:
    """``hub.load_model`` of the folder to evaluate; a damaged or mismatched file is a ConfigError naming it."""
    from . import hub
    from .files import DamagedFileError
    from .models import WeightsUnavailableError

    try:
        return hub.load_model(f"local-dir:{model_dir}")
    except (DamagedFileError, hub.CheckpointMismatchError, WeightsUnavailableError) as e:
        raise ConfigError(f"cannot load the model in {model_dir}: {e}") from e
