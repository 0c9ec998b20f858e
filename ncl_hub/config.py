"""Run configuration: typed dataclasses (a default and a help text per field), read by jsonargparse as
defaults <- YAML file (``--config``) <- ``--section.key value``.

jsonargparse owns the types and values: it converts and checks every value against its field's type (``Literal``
choices, ``Optional``, lists; numbers such as ``5e-2`` are floats), builds the dataclasses and writes ``--help``
from the docstring under each field. A thin layer here keeps what this project's command lines rely on and
jsonargparse does not do: a leaf name that is unique across sections may be used alone (``--epochs 3``,
``--lr 0.05``), a misspelled key is answered with the nearest valid ones, keys of earlier versions name what
replaced them, flags take no value (``--overwrite``; ``--resume`` alone means ``latest``), a list option may be
given one value at a time, and every problem is one :class:`ConfigError` naming the key. The same layer reads the
options of ``recipes/evaluate.py`` and ``recipes/publish.py`` (:func:`parse_options`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

from .models.moco import MocoConfig

__all__ = [
    "ModelConfig", "LossConfig", "MocoConfig", "DataConfig", "OptimConfig", "RunConfig", "ConfigError",
    "parse_args", "parse_options", "load_config", "apply_overrides", "config_from_dict", "config_to_dict",
    "save_config", "check_config", "describe", "WARMUP_STEPS_DEFAULT",
]

# Linear warm-up of the default and of every shipped config, in optimizer steps; shorter runs are warned
# (training.describe_schedule). Measured: docs/results.md, "Warm-up".
WARMUP_STEPS_DEFAULT = 500

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported before any training starts."""


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
    on_decode_error: Literal["raise", "skip"] = "raise"
    """an image that cannot be decoded: raise (stop, naming it) or skip (count it)"""
    limit_train: Optional[int] = None
    """use only the first N training images (smoke tests)"""
    limit_eval: Optional[int] = None
    """use only the first N images of each evaluation split"""


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


# keys of earlier versions, with what replaced them
_RENAMED = {
    "optim.warmup_epochs": "optim.warmup_steps (the warm-up is counted in optimizer steps: with a small dataset or "
                           "a short run, a warm-up in epochs is only a few dozen steps)",
    "warmup_epochs": "optim.warmup_steps (the warm-up is counted in optimizer steps)",
}
# options that may be given without a value, and what they mean then (every bool option means true)
_BARE_VALUES = {"resume": "latest"}
_HELP = ("Values merge as defaults <- --config YAML <- --key value. A key's last part may be used alone where it "
         "is unique (--epochs 3, --lr 0.05); flags take no value (--overwrite); --resume alone means latest.")


# ---------------------------------------------------------------------------------------------- keys
@functools.lru_cache(maxsize=None)
def _leaves(cls: type) -> Dict[str, Any]:
    """Every leaf of a (nested) options dataclass: dotted path -> type."""
    out: Dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update({f"{f.name}.{k}": v for k, v in _leaves(hints[f.name]).items()})
        else:
            out[f.name] = hints[f.name]
    return out


def _sections(cls: type) -> set:
    return {path.split(".")[0] for path in _leaves(cls) if "." in path}


def _resolve_key(key: str, leaves: Dict[str, Any], *, shortcuts: bool = True) -> str:
    """The dotted path ``key`` names: itself, or the one leaf that ends in it; else a ConfigError that names the
    replacement of an old key, the candidates of an ambiguous one, or the nearest valid keys."""
    key = key.replace("-", "_")
    if key in _RENAMED:
        raise ConfigError(f"config key {key!r} was replaced by {_RENAMED[key]}")
    if key in leaves:
        return key
    matches = [p for p in leaves if p.split(".")[-1] == key] if shortcuts else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous: write one of {matches}")
    names = list(leaves) + ([p.split(".")[-1] for p in leaves] if shortcuts else [])
    close = difflib.get_close_matches(key, list(dict.fromkeys(names)), n=4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}.{hint} Run with --help to list every key.")


def _flatten(data: Dict[str, Any], sections: set, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path in sections:
            out.update(_flatten(value, sections, path + "."))
        else:
            out[path] = value
    return out


def _nest(flat: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _is_bool(tp: Any) -> bool:
    return tp is bool or (typing.get_origin(tp) is Union and set(typing.get_args(tp)) == {bool, type(None)})


def _is_list(tp: Any) -> bool:
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else [tp]
    return any(typing.get_origin(a) in (list, List) for a in inner)


def _cli_pairs(argv: Sequence[str], leaves: Dict[str, Any], positional: Sequence[str] = ()) -> Dict[str, Any]:
    """``--key value`` / ``--key=value`` / bare flags -> {dotted path: text}; a list option given several times
    (or one value at a time) collects its values. Leading bare arguments fill ``positional`` in order."""
    pairs: Dict[str, Any] = {}
    argv, i = list(argv), 0
    for name in positional:
        if i < len(argv) and not argv[i].startswith("--"):
            pairs[name], i = argv[i], i + 1
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --key value (see --help)")
        key, eq, value = arg[2:].partition("=")
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        path = key if key == "config" else _resolve_key(key, leaves)
        if eq:
            i += 1
        elif (nxt is None or nxt.startswith("--")) and (path in _BARE_VALUES or _is_bool(leaves.get(path))):
            value, i = _BARE_VALUES.get(path, "true"), i + 1
        elif nxt is None:
            raise ConfigError(f"option --{key} needs a value")
        else:
            value, i = nxt, i + 2
        if path in leaves and _is_list(leaves[path]) and not value.lstrip().startswith("["):
            pairs[path] = [*pairs.get(path, []), value] if isinstance(pairs.get(path), list) else [value]
        else:
            pairs[path] = value
    return pairs


# ---------------------------------------------------------------------------------------------- parsing
@functools.lru_cache(maxsize=None)
def _parser(cls: type, description: str = _HELP):
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # each field's help is the docstring under it
    parser = ArgumentParser(prog=Path(sys.argv[0]).name, description=description, exit_on_error=False,
                            allow_abbrev=False)
    if cls is RunConfig:
        parser.add_argument("--config", type=Optional[str], help="YAML file of values (sections as mappings)")
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=True)
    defaults = parser.get_defaults()
    missing = [path for path in _leaves(cls) if path not in defaults]
    if missing:  # jsonargparse skips a class it cannot inspect (e.g. its module is not in sys.modules)
        raise TypeError(f"jsonargparse made no option of {sorted(missing)} of {cls.__qualname__}")
    return parser


def _expects(key: str, tp: Any, value: Any) -> str:
    choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
    if choices:
        names = [str(c) for c in choices]
        return f"{key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}"
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else [tp]
    name = " or ".join(getattr(a, "__name__", None) or str(a).replace("typing.", "") for a in inner)
    return f"config key {key!r} expects {name}, got {value!r}"


def _parse(cls: Type[T], layers: Sequence[Tuple[str, Dict[str, Any]]], base: Optional[T] = None) -> T:
    """Merge ``layers`` (source, {dotted path: value or command-line text}) over ``base`` (default: the defaults)
    with jsonargparse and build the dataclass; a bad value is a ConfigError naming its source and key."""
    from jsonargparse import ArgumentError

    parser, leaves = _parser(cls), _leaves(cls)
    ns = parser.get_defaults() if base is None else parser.parse_object(config_to_dict(base))
    for source, values in layers:
        values = {k: v for k, v in values.items() if k != "config"}
        try:
            if source == "command line":
                args = [a for k, v in values.items() for a in (f"--{k}", _cli_text(v, leaves[k]))]
                ns = parser.parse_args(args, namespace=ns)
            else:
                ns = parser.parse_object(_nest(values), namespace=ns)
        except ArgumentError as e:
            match = re.search(r'Parser key "([^"]+)"', str(e))
            key = match.group(1) if match else None
            if key in leaves:
                raise ConfigError(f"{source}: {_expects(key, leaves[key], values.get(key))}") from None
            raise ConfigError(f"{source}: {str(e).strip()}") from None
    try:
        built = parser.instantiate(ns)
        return cls(**{f.name: built[f.name] for f in dataclasses.fields(cls)})
    except (TypeError, ValueError) as e:  # a dataclass's own check (MocoConfig)
        raise ConfigError(str(e)) from None


def _cli_text(value: Any, tp: Any) -> str:
    if isinstance(value, list):  # collected one value at a time
        return "[" + ", ".join(value) + "]"
    optional = typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)
    return "null" if optional and value.strip() in ("none", "None", "~") else value


def _read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a damaged or foreign file: name it, not a traceback
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({e}); fix or replace it") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping, got {type(data).__name__}")
    return data


def _data_layer(data: Dict[str, Any], source: str) -> Tuple[str, Dict[str, Any]]:
    """A mapping of values (a YAML file, a saved config) with every key checked."""
    leaves = _leaves(RunConfig)
    try:
        return source, {_resolve_key(k, leaves, shortcuts=False): v
                        for k, v in _flatten(data, _sections(RunConfig)).items()}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_args(argv: Optional[Sequence[str]] = None, base: Optional[RunConfig] = None) -> RunConfig:
    """``[--config FILE.yaml] [--key value ...]`` -> RunConfig: defaults (or ``base``) <- YAML <- command line.
    ``--help`` prints every key with its type, default and help, and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(describe())
        raise SystemExit(0)
    pairs = _cli_pairs(argv, _leaves(RunConfig))
    layers = [_data_layer(_read_yaml(pairs["config"]), str(pairs["config"]))] if pairs.get("config") else []
    return _parse(RunConfig, [*layers, ("command line", pairs)], base)


def load_config(path: Union[str, Path], base: Optional[RunConfig] = None) -> RunConfig:
    """A YAML file (plain data, sections as nested mappings) merged over ``base`` (default: the defaults)."""
    return _parse(RunConfig, [_data_layer(_read_yaml(path), str(path))], base)


def config_from_dict(data: Dict[str, Any]) -> RunConfig:
    """A saved config (``config_to_dict``'s layout, e.g. a run's config.yaml) merged over the defaults."""
    return _parse(RunConfig, [_data_layer(data, "saved config")])


def apply_overrides(cfg: RunConfig, values: Dict[str, Any]) -> RunConfig:
    """``cfg`` with ``{key: command-line text}`` applied (keys as on the command line); ``cfg`` is unchanged."""
    leaves = _leaves(RunConfig)
    return _parse(RunConfig, [("command line", {_resolve_key(k, leaves): v for k, v in values.items()})], cfg)


def parse_options(cls: Type[T], argv: Sequence[str], *, positional: Sequence[str] = (), description: str = "",
                  overrides_of: Optional[type] = None) -> Tuple[T, Dict[str, Any]]:
    """A recipe's own options (a dataclass) from ``argv``, read like the training options.

    Returns ``(options, overrides)``: with ``overrides_of`` (e.g. RunConfig), keys that are not options of ``cls``
    but keys of ``overrides_of`` are returned as ``{dotted path: text}`` for :func:`apply_overrides`.
    """
    if "-h" in argv or "--help" in argv:
        print(_parser(cls, description).format_help())
        raise SystemExit(0)
    own = _leaves(cls)
    other = _leaves(overrides_of) if overrides_of is not None else {}
    known = {**other, **own}
    pairs = _cli_pairs(argv, known, positional)
    missing = [f"{name}" for name in positional if name not in pairs]
    if missing:
        raise ConfigError(f"missing {', '.join(missing).upper()} (see --help)")
    mine = {k: v for k, v in pairs.items() if k in own}
    return _parse(cls, [("command line", mine)]), {k: v for k, v in pairs.items() if k not in own}


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe() -> str:
    """Every key with its type, default and help (the --help text)."""
    return _parser(RunConfig).format_help()


# ---------------------------------------------------------------------------------------------- checks
def check_config(cfg: RunConfig) -> None:
    """Checks of values that need neither data nor processes (run before Accelerate starts)."""
    for path, tp in _leaves(RunConfig).items():  # also for configs built in code, not parsed
        value = functools.reduce(getattr, path.split("."), cfg)
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ConfigError(_expects(path, tp, value))
    checks = [
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (0 < cfg.loss.hard_ratio < 1, f"loss.hard_ratio must be in (0, 1), got {cfg.loss.hard_ratio}"),
        (cfg.grad_accum >= 1, f"grad_accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.data.val_per_class >= 0, f"data.val_per_class must be >= 0, got {cfg.data.val_per_class}"),
        (cfg.optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}"),
        (cfg.loss.ramp_steps >= 0, f"loss.ramp_steps must be >= 0, got {cfg.loss.ramp_steps}"),
        (all(0 < m <= 1 for m in cfg.optim.milestones),
         "optim.milestones are fractions of the run in (0, 1] (the paper's 320 and 360 of 400 epochs are 0.8 and "
         f"0.9), got {[m for m in cfg.optim.milestones if not 0 < m <= 1]}"),
        (cfg.model.num_experts >= 1, f"model.num_experts must be >= 1, got {cfg.model.num_experts}"),
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
