"""Run configuration: dataclasses with defaults and one-line help, merged defaults <- YAML <- ``--key value``.

Keys are dotted paths (``--optim.lr 0.05``); a leaf name that is unique across sections may be used
alone (``--lr 0.05``, ``--epochs 3``). Unknown keys and values of the wrong type are errors that name
the key, suggest close matches and say what type was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

__all__ = [
    "ModelConfig", "LossConfig", "MocoOptions", "DataConfig", "OptimConfig", "RunConfig", "ConfigError",
    "parse_args", "load_config", "config_to_dict", "save_config", "describe",
]


# Linear warm-up of the default and of every shipped config, in optimizer steps; shorter runs are warned
# (training.check_schedule). Measured: docs/results.md, "Warm-up".
WARMUP_STEPS_DEFAULT = 500


class ConfigError(ValueError):
    """A configuration problem, reported before any training starts."""


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" mirrors argparse
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name: Optional[str] = _f(None, "a registered NCL model (e.g. ncl_resnet32_cifar100lt) whose architecture is used")
    backbone: str = _f("resnet8_cifar_tiny", "timm backbone of every expert (ignored when name is set)")
    num_experts: int = _f(3, "K, the number of experts")
    classifier: str = _f("linear", "expert head: linear | cosine")
    cosine_scale: float = _f(16.0, "scale s of the cosine classifier")
    pretrained_backbone: bool = _f(False, "start every trunk from timm's pretrained weights for the backbone")
    backbone_kwargs: Dict[str, Any] = _f({}, "extra keyword arguments for each trunk's timm.create_model")
    grad_checkpointing: bool = _f(False, "gradient checkpointing in the trunks (less memory, more compute)")
    expert_execution: str = _f("sequential", "sequential | batched: run the K experts as one vmapped computation "
                                             "(grouped convolutions; for small trunks on a GPU)")


@dataclass
class LossConfig:
    name: str = _f("ncl", "training loss: ncl | bsce (Balanced Softmax CE per expert) | ce (plain CE per expert)")
    variant: str = _f("paper", "NCL equations: paper | official (the authors' released code)")
    hard_ratio: float = _f(0.3, "beta: share of classes mined as hard negatives, in (0, 1)")
    distill_weight: float = _f(0.6, "lambda: weight of the NBOD distillation terms")
    anchor: Optional[int] = _f(None, "expert whose logits choose the hard classes; null = random per step")
    ramp_steps: int = _f(0, "ramp the hard-category and distillation terms in linearly over this many optimizer "
                            "steps (0 = off: the paper's form from the first step)")


@dataclass
class MocoOptions:
    enabled: bool = _f(False, "add a MoCo-v2 self-supervised branch per expert (paper section 3.5)")
    dim: int = _f(128, "projection output size")
    hidden_dim: Optional[int] = _f(None, "projection hidden size; null = the trunk's feature size")
    queue_size: int = _f(65536, "negative keys kept per expert")
    temperature: float = _f(0.2, "InfoNCE temperature")
    momentum: float = _f(0.999, "EMA factor of the key encoders")
    weight: float = _f(1.0, "weight of the contrastive loss")


@dataclass
class DataConfig:
    dataset: str = _f("digits", "digits (offline demo) | a Hub dataset id | a local parquet/arrow/image folder | "
                                "imagenet_lt | places_lt | inat2018 (with benchmark_root)")
    config_name: Optional[str] = _f(None, "dataset configuration name (Hub datasets)")
    train_split: str = _f("train", "split to train on")
    test_split: Optional[str] = _f("test", "split to evaluate on at the end (never used for selection)")
    image_column: Optional[str] = _f(None, "image column; null = detect img/image")
    label_column: Optional[str] = _f(None, "label column; null = detect label/fine_label")
    benchmark_root: Optional[str] = _f(None, "image root of imagenet_lt / places_lt / inat2018")
    imbalance_factor: Optional[float] = _f(None, "make a balanced train split long-tailed with this IF (>= 1)")
    lt_profile: str = _f("exp", "long-tail profile: exp | step")
    lt_head_size: Optional[int] = _f(None, "images of the head class of the long-tailed subset (null = the largest "
                                           "class, as CIFAR-LT); smaller values make a small-data benchmark")
    lt_seed: Optional[int] = _f(0, "which images are kept per class, and which become validation; null = the first "
                                   "n_i (Cui et al.)")
    val_per_class: int = _f(20, "balanced validation images per class for model selection (0 = none): the dataset's "
                                "own validation split if it has one, else images the long-tail subsampling left out, "
                                "else held out of the training split")
    sampler: str = _f("instance", "instance | class | sqrt | progressive")
    augment: str = _f("cifar", "train augmentation: cifar | randaugment | simclr | none")
    batch_size: int = _f(64, "images per optimizer step over all processes (effective batch)")
    eval_batch_size: int = _f(256, "images per evaluation batch per process")
    num_workers: int = _f(2, "DataLoader worker processes per training process")
    on_decode_error: str = _f("raise", "an image that cannot be decoded: raise (stop, naming it) | skip (count it)")
    limit_train: Optional[int] = _f(None, "use only the first N training images (smoke tests)")
    limit_eval: Optional[int] = _f(None, "use only the first N images of each evaluation split")


@dataclass
class OptimConfig:
    lr: float = _f(0.1, "peak learning rate for batch_size")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(2e-4, "weight decay on all parameters")
    schedule: str = _f("cosine", "multistep | cosine")
    warmup_steps: int = _f(WARMUP_STEPS_DEFAULT, "linear warm-up length in optimizer steps (not epochs: it must not "
                                                 "shrink with the dataset or the run)")
    milestones: List[float] = _f([0.8, 0.9], "multistep: fractions of the run in (0, 1] where the rate is multiplied "
                                             "by gamma (the paper's 320 and 360 of 400 epochs)")
    gamma: float = _f(0.1, "multistep decay factor")
    min_lr: float = _f(0.0, "cosine: final learning rate")
    clip_grad_norm: Optional[float] = _f(None, "clip the gradient norm to this value (null = off)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "architecture"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "objective"})
    moco: MocoOptions = field(default_factory=MocoOptions, metadata={"help": "self-supervised branch"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data and sampling"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer and schedule"})
    epochs: int = _f(30, "training epochs")
    seed: int = _f(42, "random seed (model init, sampling, augmentation)")
    output_dir: str = _f("outputs/digits_demo", "run folder: config, checkpoints, best model, evaluation, exports")
    mixed_precision: str = _f("no", "no | fp16 | bf16 (Accelerate autocast; losses stay float32)")
    grad_accum: int = _f(1, "gradient accumulation steps (batch_size and lr are those of one optimizer step)")
    compile: Optional[bool] = _f(None, "torch.compile each expert's trunk for training: true | false | null = auto "
                                       "(compile when the run has >= 2000 optimizer steps: the first step compiles "
                                       "for minutes on a CPU, then each step is faster)")
    deterministic: bool = _f(False, "torch deterministic algorithms (exact resume on CPU)")
    log_with: Optional[str] = _f(None, "Accelerate tracker: tensorboard | wandb | ... (null = none)")
    log_every: int = _f(20, "optimizer steps between progress-bar and tracker updates")
    keep_last: int = _f(2, "epoch checkpoints kept (accelerator.save_state folders)")
    save_every_steps: Optional[int] = _f(None, "also checkpoint every N optimizer steps within an epoch")
    resume: Optional[str] = _f(None, "latest | a checkpoint folder: continue a run exactly where it stopped")
    overwrite: bool = _f(False, "allow writing into an output folder that holds another run")
    eval_splits: List[str] = _f(["val", "test"], "splits evaluated at the end")
    max_steps_per_epoch: Optional[int] = _f(None, "stop each epoch after N optimizer steps (smoke tests)")
    init_from: Optional[str] = _f(None, "fine-tune: hf-hub:ORG/NAME | local-dir:PATH | a registered name")
    init_experts: Optional[List[int]] = _f(None, "fine-tune: which experts of init_from fill the K slots")
    freeze_trunks: bool = _f(False, "fine-tune: train the heads only (linear probe)")
    push_to_hub: Optional[str] = _f(None, "after training, publish ORG/NAME and ORG/NAME-expert")
    hub_private: bool = _f(False, "create the Hub repos private")


_SECTIONS = {f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)}  # type: ignore


def _leaf_paths(cls: type = RunConfig, prefix: str = "") -> Dict[str, Tuple[type, Any]]:
    out: Dict[str, Tuple[type, Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_paths(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (tp, f)
    return out


_LEAVES = _leaf_paths()


# keys of earlier versions, with what replaced them
_RENAMED = {
    "optim.warmup_epochs": "optim.warmup_steps (the warm-up is counted in optimizer steps: with a small dataset or "
                           "a short run, a warm-up in epochs is only a few dozen steps)",
    "warmup_epochs": "optim.warmup_steps (the warm-up is counted in optimizer steps)",
}


def _resolve_key(key: str) -> str:
    key = key.replace("-", "_")
    if key in _RENAMED:
        raise ConfigError(f"config key {key!r} was replaced by {_RENAMED[key]}")
    if key in _LEAVES:
        return key
    matches = [p for p in _LEAVES if p.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous: write one of {matches}")
    close = difflib.get_close_matches(key, list(_LEAVES) + [p.split(".")[-1] for p in _LEAVES], n=4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}.{hint} Run with --help to list every key.")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any, from_cli: bool) -> Any:
    """Convert ``value`` to ``tp`` (from a YAML value or a CLI string) or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(key, inner[0], value, from_cli)
    if from_cli and isinstance(value, str) and tp not in (str,):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--{key}: cannot parse {value!r}: {e}") from e
    bad = ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-2 and 2e-4 (no dot) as strings
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            if from_cli and isinstance(value, (int, float, str)):
                value = [value]
            else:
                raise bad
        return [_coerce(f"{key}[]", args[0], v, False) for v in value] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and path in _SECTIONS:
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def _set(cfg: RunConfig, path: str, value: Any) -> None:
    obj: Any = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def apply_overrides(cfg: RunConfig, values: Dict[str, Any], *, from_cli: bool, source: str) -> RunConfig:
    for key, value in values.items():
        try:
            path = _resolve_key(key)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        tp, _ = _LEAVES[path]
        try:
            _set(cfg, path, _coerce(path, tp, value, from_cli))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: Union[str, Path], cfg: Optional[RunConfig] = None) -> RunConfig:
    """Merge a YAML file (plain data, sections as nested mappings) over ``cfg`` (default: defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a damaged or foreign file: name it, not a traceback
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({e}); fix or replace it") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping, got {type(data).__name__}")
    return apply_overrides(cfg or RunConfig(), _flatten(data), from_cli=False, source=str(path))


# flags that take no value
_FLAGS = {"overwrite": True, "deterministic": True, "compile": True, "freeze_trunks": True, "hub_private": True}


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """``--config FILE [--key value ...]`` -> RunConfig (defaults <- YAML <- command line)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(describe())
        raise SystemExit(0)
    config_file = None
    pairs: List[Tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --key value (see --help)")
        key, eq, val = arg[2:].partition("=")
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if eq:
            i += 1
        elif key.replace("-", "_") in _FLAGS and (nxt is None or nxt.startswith("--")):
            val, i = "true", i + 1
        elif key == "resume" and (nxt is None or nxt.startswith("--")):
            val, i = "latest", i + 1
        else:
            if nxt is None:
                raise ConfigError(f"option --{key} needs a value")
            val, i = nxt, i + 2
        if key == "config":
            config_file = val
        else:
            pairs.append((key, val))
    cfg = load_config(config_file) if config_file else RunConfig()
    for key, val in pairs:
        apply_overrides(cfg, {key: val}, from_cli=True, source="command line")
    return cfg


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: Dict[str, Any]) -> RunConfig:
    return apply_overrides(RunConfig(), _flatten(data), from_cli=False, source="saved config")


def save_config(cfg: RunConfig, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe() -> str:
    """Every key with its type, default and help (the --help text)."""
    lines = ["usage: train.py [--config FILE.yaml] [--key value ...]", "",
             "Values merge as defaults <- YAML file <- command line. Keys:"]
    defaults = _flatten(config_to_dict(RunConfig()))
    for path, (tp, f) in _LEAVES.items():
        lines.append(f"  --{path:<28} {_type_name(tp):<18} default {defaults[path]!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
