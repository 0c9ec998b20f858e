"""Run configuration: typed dataclasses, a default and a help text (the docstring under it) per field, merged as
defaults <- YAML file (``--config``) <- ``--section.key value`` by :mod:`ncl_hub.cli` (jsonargparse).

A leaf name that is unique across sections may be used alone (``--lr 0.05``, ``--epochs 3``); unknown keys and
values of the wrong type are errors that name the key, suggest close matches and say what was expected.
``python recipes/train.py --help`` lists every key with its type, default and help.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml

from . import files
from .cli import (
    DEBUG_HELP, ConfigError, cli_pairs, data_layer, describe as _describe, expects, flatten, leaves, parse,
    parse_options, read_yaml, resolve_key,
)

__all__ = [
    "ModelConfig", "LossConfig", "MocoConfig", "DataConfig", "OptimConfig", "RunConfig", "ConfigError",
    "parse_args", "parse_options", "load_config", "apply_overrides", "config_from_dict", "config_to_dict",
    "save_config", "check_config", "describe", "flat_config", "loss_departures", "WARMUP_STEPS_DEFAULT",
]

# Linear warm-up of the default and of every shipped config, in optimizer steps; shorter runs are warned
# (training.describe_schedule). Measured: docs/results.md, "Warm-up".
WARMUP_STEPS_DEFAULT = 250


@dataclass
class ModelConfig:
    """The NCL model: K experts over a timm backbone."""

    name: Optional[str] = None
    """a registered NCL model (e.g. ncl_resnet32_cifar100lt) whose architecture is used"""
    backbone: str = "resnet8_cifar_tiny"
    """timm backbone of every expert (ignored when name is set)"""
    num_experts: int = 3
    """K, the number of experts"""
    classifier: Literal["linear", "cosine"] = "linear"
    """expert head"""
    cosine_scale: float = 16.0
    """scale s of the cosine classifier"""
    pretrained_backbone: bool = False
    """start every trunk from timm's pretrained weights for the backbone"""
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    """extra keyword arguments for each trunk's timm.create_model"""
    grad_checkpointing: bool = False
    """gradient checkpointing in the trunks (less memory, more compute)"""
    expert_execution: Literal["sequential", "batched"] = "sequential"
    """batched: run the K experts as one vmapped computation (grouped convolutions; for small trunks on a GPU)"""


@dataclass
class MocoConfig:
    """MoCo-v2 branch of each expert (paper section 3.5).

    The projection is Linear(D, hidden_dim) - ReLU - Linear(hidden_dim, dim) on both the query and the key side;
    the key side (trunk and projection) is a momentum copy of the query side. ``weight`` and ``temperature`` are
    read by the loss, the rest by the model.
    """

    enabled: bool = True
    """add a MoCo-v2 self-supervised branch per expert (paper section 3.5)"""
    dim: int = 128
    """projection output size"""
    hidden_dim: Optional[int] = None
    """projection hidden size; null = the trunk's feature size"""
    queue_size: int = 65536
    """negative keys kept per expert"""
    temperature: float = 0.2
    """InfoNCE temperature"""
    momentum: float = 0.999
    """EMA factor of the key encoders"""
    weight: float = 1.0
    """weight of the contrastive loss"""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.queue_size < 1:
            raise ValueError(f"MoCo dim and queue_size must be >= 1, got dim={self.dim}, queue_size={self.queue_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"MoCo momentum must be in [0, 1), got {self.momentum}")
        if self.temperature <= 0:
            raise ValueError(f"MoCo temperature must be > 0, got {self.temperature}")

    @classmethod
    def from_any(cls, value: Union[None, bool, dict, "MocoConfig"]) -> Optional["MocoConfig"]:
        """The branch to build: None for None, False or ``enabled=False``; True gives the defaults; a dict holds
        fields (``enabled`` defaults to true there)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown MoCo option(s) {unknown}; valid: {sorted(known)}")
            value = cls(**value)
        if isinstance(value, cls):
            return value if value.enabled else None
        raise TypeError(f"moco must be None, a dict or a MocoConfig, got {type(value).__name__}")


@dataclass
class LossConfig:
    """The training objective."""

    name: Literal["ncl", "bsce", "ce"] = "ncl"
    """training loss: ncl, bsce (Balanced Softmax CE per expert) or ce (plain CE per expert)"""
    variant: Literal["paper", "official"] = "paper"
    """NCL equations: the paper's, or the authors' released code's"""
    hard_ratio: float = 0.3
    """beta: share of classes mined as hard negatives, in (0, 1)"""
    distill_weight: float = 0.6
    """lambda: weight of the NBOD distillation terms"""
    anchor: Optional[int] = None
    """expert whose logits choose the hard classes; null = random per step"""
    ramp_steps: int = 0
    """ramp the hard-category and distillation terms in linearly over this many optimizer steps (0 = off: the
    paper's form from the first step)"""
    hard_weight: float = 0.0
    """weight of the hard-category terms (NIL and NBOD on the mined classes): 1 = the paper (the paper configs set
    it); 0, the default, drops Hard Category Mining, which slowed every expert's fit and cost accuracy at each
    schedule measured in docs/results.md (an option beside the paper's form, named in the model card)"""


def loss_departures(loss: Dict[str, Any]) -> List[str]:
    """The NCL options of ``loss`` (a ``LossConfig`` as a dict, as saved with a run) set away from the paper's
    objective, each a phrase naming its key; empty for the paper's form. The trainer prints them, the card
    lists them."""
    departures = []
    if loss.get("hard_weight", 1) != 1:
        departures.append(f"hard-category terms weighted {loss['hard_weight']:g} (hard_weight)")
    if loss.get("ramp_steps"):
        departures.append(
            f"hard-category and distillation terms ramped in over {loss['ramp_steps']} steps (ramp_steps)")
    return departures


@dataclass
class DataConfig:
    """The dataset, its long-tailed training split, validation and sampling."""

    dataset: str = "digits"
    """digits (offline demo) | a Hub dataset id | a local parquet/arrow/image folder | imagenet_lt | places_lt |
    inat2018 (with benchmark_root)"""
    config_name: Optional[str] = None
    """dataset configuration name (Hub datasets)"""
    train_split: str = "train"
    """split to train on"""
    test_split: Optional[str] = "test"
    """split to evaluate on at the end (never used for selection)"""
    image_column: Optional[str] = None
    """image column; null = detect img/image"""
    label_column: Optional[str] = None
    """label column; null = detect label/fine_label"""
    benchmark_root: Optional[str] = None
    """image root of imagenet_lt / places_lt / inat2018"""
    imbalance_factor: Optional[float] = None
    """make a balanced train split long-tailed with this IF (>= 1)"""
    lt_profile: Literal["exp", "step"] = "exp"
    """long-tail profile"""
    lt_head_size: Optional[int] = None
    """images of the head class of the long-tailed subset (null = the largest class, as CIFAR-LT); smaller values
    make a small-data benchmark"""
    lt_seed: Optional[int] = 0
    """which images are kept per class, and which become validation; null = the first n_i (Cui et al.)"""
    val_per_class: int = 20
    """balanced validation images per class for model selection (0 = none): the dataset's own validation split if
    it has one, else images the long-tail subsampling left out, else held out of the training split"""
    sampler: Literal["instance", "class", "sqrt", "progressive"] = "instance"
    """which images each epoch draws"""
    augment: Literal["cifar", "randaugment", "simclr", "none"] = "cifar"
    """train augmentation"""
    batch_size: int = 64
    """images per optimizer step over all processes (effective batch)"""
    eval_batch_size: int = 256
    """images per evaluation batch per process"""
    num_workers: int = 2
    """DataLoader worker processes per training process"""
    skip_unreadable: bool = False
    """every image of the splits a run uses is decoded once before training: false stops with one error naming
    each unreadable file (truncated, empty, not an image, a decompression bomb); true leaves them out and lists
    them in run_info.json and the model card. An image that turns unreadable later is skipped and named"""
    check_cache: Optional[str] = None
    """folder of the image-check records, keyed by the images' content (default: ncl_hub_checked beside the
    Hugging Face datasets cache)"""
    limit_train: Optional[int] = None
    """use only the first N training images (smoke tests)"""
    limit_eval: Optional[int] = None
    """use only the first N images of each evaluation split"""
    pipeline: Literal["pil", "tensor"] = "pil"
    """pil: decode and augment every image in DataLoader workers (PIL); tensor: decode each split once to a uint8
    tensor (cached on disk, see tensor_cache), keep it on the training device and augment whole batches there with
    per-sample parameters (augment cifar | none, no MoCo, one process)"""
    tensor_cache: Optional[str] = None
    """pipeline=tensor: folder of the decoded splits, keyed by the images, the selection and the input size
    (null = ncl_hub_decoded beside the Hugging Face datasets cache)"""
    tensor_chunk: int = 4096
    """pipeline=tensor: images augmented per call (more: fewer kernel launches on a GPU, more memory)"""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "sgd"
    """timm optimizer (timm.optim.create_optimizer_v2): sgd (Nesterov momentum, the paper's), momentum, adamw
    (ViT / ConvNeXt trunks), ..."""
    lr: float = 0.1
    """peak learning rate for batch_size"""
    momentum: float = 0.9
    """momentum of sgd / momentum"""
    nesterov: bool = True
    """sgd: Nesterov momentum (false: plain momentum SGD)"""
    weight_decay: float = 2e-4
    """weight decay"""
    filter_bias_and_bn: bool = False
    """no weight decay on biases and norm layers (timm's rule for ViT / ConvNeXt); false: on every parameter, as the
    released NCL (names in a trunk's no_weight_decay() never decay)"""
    layer_decay: Optional[float] = None
    """layer-wise learning-rate decay over the trunks' group_matcher layers (null = off)"""
    schedule: Literal["multistep", "cosine"] = "cosine"
    """learning-rate schedule after the warm-up"""
    warmup_steps: int = WARMUP_STEPS_DEFAULT
    """linear warm-up length in optimizer steps (not epochs: it must not shrink with the dataset or the run)"""
    milestones: List[float] = field(default_factory=lambda: [0.8, 0.9])
    """multistep: fractions of the run in (0, 1] where the rate is multiplied by gamma (the paper's 320 and 360 of
    400 epochs)"""
    gamma: float = 0.1
    """multistep decay factor"""
    min_lr: float = 0.0
    """cosine: final learning rate"""
    clip_grad_norm: Optional[float] = None
    """clip the gradient norm to this value (null = off)"""


@dataclass
class RunConfig:
    """One training run (recipes/train.py): every section, and the run's own options."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """architecture"""
    loss: LossConfig = field(default_factory=LossConfig)
    """objective"""
    moco: MocoConfig = field(default_factory=lambda: MocoConfig(enabled=False))
    """self-supervised branch"""
    data: DataConfig = field(default_factory=DataConfig)
    """data and sampling"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optimizer and schedule"""
    epochs: int = 30
    """training epochs"""
    seed: int = 42
    """random seed (model init, sampling, augmentation)"""
    output_dir: str = "outputs/digits_demo"
    """run folder: config, checkpoints, best model, evaluation, exports"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Accelerate autocast (losses stay float32)"""
    grad_accum: int = 1
    """gradient accumulation steps (batch_size and lr are those of one optimizer step)"""
    compile: Optional[bool] = None
    """torch.compile each expert's trunk for training: true | false | null = auto (compile when the run has >= 2000
    optimizer steps: the first step compiles for minutes on a CPU, then each step is faster)"""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode when compiling; reduce-overhead replays the step as CUDA graphs (GPU)"""
    compile_scope: Literal["trunks", "step"] = "trunks"
    """what is compiled: each expert's trunk on its own, or the whole forward and loss as one graph (batched
    experts always compile the step)"""
    channels_last: bool = False
    """keep the model and the input batches in channels-last memory format (faster convolutions on GPUs)"""
    deterministic: bool = False
    """torch deterministic algorithms (exact resume on CPU)"""
    log_with: Optional[str] = None
    """Accelerate tracker: tensorboard | wandb | ... (null = none)"""
    log_every: int = 20
    """optimizer steps between progress-bar and tracker updates"""
    keep_last: int = 2
    """epoch checkpoints kept (accelerator.save_state folders)"""
    save_every_steps: Optional[int] = None
    """also checkpoint every N optimizer steps within an epoch"""
    resume: Optional[str] = None
    """latest | a checkpoint folder: continue a run exactly where it stopped (--resume alone: latest)"""
    overwrite: bool = False
    """allow writing into an output folder that holds another run"""
    eval_splits: List[str] = field(default_factory=lambda: ["val", "test"])
    """splits evaluated at the end"""
    max_steps_per_epoch: Optional[int] = None
    """stop each epoch after N optimizer steps (smoke tests)"""
    init_from: Optional[str] = None
    """fine-tune: hf-hub:ORG/NAME | local-dir:PATH | a registered name"""
    init_experts: Optional[List[int]] = None
    """fine-tune: which experts of init_from fill the K slots"""
    freeze_trunks: bool = False
    """fine-tune: train the heads only (linear probe)"""
    push_to_hub: Optional[str] = None
    """after training, publish ORG/NAME and ORG/NAME-expert"""
    hub_private: bool = False
    """create the Hub repos private"""


# keys of earlier versions, with what replaced them; a saved config (a run's config.yaml) may still hold them and
# is read without them
_RENAMED = {
    "data.on_decode_error": "data.skip_unreadable (every image is checked before training; an unreadable one stops "
                            "the run, or is left out with --data.skip_unreadable true)",
    "on_decode_error": "data.skip_unreadable (every image is checked before training)",
    "optim.warmup_epochs": "optim.warmup_steps (the warm-up is counted in optimizer steps: with a small dataset or "
                           "a short run, a warm-up in epochs is only a few dozen steps)",
    "warmup_epochs": "optim.warmup_steps (the warm-up is counted in optimizer steps)",
}
# settings that no longer exist: a saved config that holds them (a run's config.yaml) is read without them
_RETIRED = ("data.on_decode_error",)
# options that may be given without a value, and what they mean then (every bool option means true)
_BARE = {"resume": "latest"}
_HELP = ("Values merge as defaults <- --config YAML <- --key value. A key's last part may be used alone where it "
         "is unique (--epochs 3, --lr 0.05); flags take no value (--overwrite); --resume alone means latest. "
         + DEBUG_HELP)


def parse_args(argv: Optional[Sequence[str]] = None, base: Optional[RunConfig] = None) -> RunConfig:
    """``[--config FILE.yaml] [--key value ...]`` -> RunConfig: defaults (or ``base``) <- YAML <- command line.
    ``--help`` prints every key with its type, default and help, and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(describe())
        raise SystemExit(0)
    pairs = cli_pairs(argv, RunConfig, bare=_BARE, renamed=_RENAMED)
    layers = [_file_layer(pairs["config"])] if pairs.get("config") else []
    return parse(RunConfig, [*layers, ("command line", pairs)], base)


def _file_layer(path: Union[str, Path]):
    return data_layer(RunConfig, read_yaml(path), str(path), _RENAMED)


def load_config(path: Union[str, Path], base: Optional[RunConfig] = None) -> RunConfig:
    """A saved YAML config (plain data, sections as nested mappings; a run's config.yaml) merged over ``base``
    (default: the defaults). Settings an earlier version wrote that no longer exist are left out."""
    return parse(RunConfig, [data_layer(RunConfig, read_yaml(path), str(path), _RENAMED, _RETIRED)], base)


def config_from_dict(data: Dict[str, Any]) -> RunConfig:
    """A saved config (``config_to_dict``'s layout, e.g. a run's config.yaml) merged over the defaults."""
    return parse(RunConfig, [data_layer(RunConfig, data, "saved config", _RENAMED, _RETIRED)])


def apply_overrides(cfg: RunConfig, values: Dict[str, Any]) -> RunConfig:
    """``cfg`` with ``values`` applied: ``{key as on the command line: its text, or a value}``; ``cfg`` is unchanged."""
    known = leaves(RunConfig)
    pairs = {resolve_key(k, known, renamed=_RENAMED): v if isinstance(v, str) else json.dumps(v)
             for k, v in values.items()}
    return parse(RunConfig, [("command line", pairs)], cfg)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_config(cfg: Union[RunConfig, Dict[str, Any]]) -> Dict[str, Any]:
    """A run configuration (or ``config_to_dict``'s mapping) as ``{dotted key: value}``, e.g. ``"optim.lr": 0.1``:
    how studies compare two runs' settings and trackers log them."""
    data = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
    return flatten(data, {path.split(".")[0] for path in leaves(RunConfig) if "." in path})


def save_config(cfg: RunConfig, path: Union[str, Path]) -> None:
    files.atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe() -> str:
    """Every key with its type, default and help (the --help text)."""
    return _describe(RunConfig, _HELP, config_file=True)


# ---------------------------------------------------------------------------------------------- checks
def check_config(cfg: RunConfig) -> None:
    """Checks of values that need neither data nor processes (run before Accelerate starts)."""
    for path, tp in leaves(RunConfig).items():  # also for configs built in code, not parsed
        value = functools.reduce(getattr, path.split("."), cfg)
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ConfigError(expects(path, tp, value))
    checks = [
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (0 < cfg.loss.hard_ratio < 1, f"loss.hard_ratio must be in (0, 1), got {cfg.loss.hard_ratio}"),
        (cfg.grad_accum >= 1, f"grad_accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.data.val_per_class >= 0, f"data.val_per_class must be >= 0, got {cfg.data.val_per_class}"),
        (cfg.optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}"),
        (cfg.loss.ramp_steps >= 0, f"loss.ramp_steps must be >= 0, got {cfg.loss.ramp_steps}"),
        (cfg.loss.hard_weight >= 0, f"loss.hard_weight must be >= 0, got {cfg.loss.hard_weight}"),
        (all(0 < m <= 1 for m in cfg.optim.milestones),
         "optim.milestones are fractions of the run in (0, 1] (the paper's 320 and 360 of 400 epochs are 0.8 and "
         f"0.9), got {[m for m in cfg.optim.milestones if not 0 < m <= 1]}"),
        (cfg.model.num_experts >= 1, f"model.num_experts must be >= 1, got {cfg.model.num_experts}"),
        (cfg.data.tensor_chunk >= 1, f"data.tensor_chunk must be >= 1, got {cfg.data.tensor_chunk}"),
        (not (cfg.model.expert_execution == "batched" and cfg.model.grad_checkpointing),
         "model.expert_execution=batched does not combine with model.grad_checkpointing; turn one of them off"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_optimizer(cfg.optim.name)


def _check_optimizer(name: str) -> None:
    from timm.optim import list_optimizers

    valid = list_optimizers()
    if name.lower().split("_")[-1] not in valid:
        close = difflib.get_close_matches(name, valid, n=4)
        raise ConfigError(f"optim.name {name!r} is not a timm optimizer" + (f"; did you mean {', '.join(close)}?"
                          if close else f"; choose one of {', '.join(valid)}"))
