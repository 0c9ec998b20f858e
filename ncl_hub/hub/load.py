"""Loading NCL models with their weights: from a local export, a Hub repo or a registered name (:func:`load_model`,
through ``timm.create_model``), a plain-timm export wrapped as a one-expert NCL model, and copying an export's
experts into a model built for fine-tuning (:func:`init_from`, :func:`freeze_trunks`).

Weights are read from safetensors (or ``torch.load(weights_only=True)``); nothing here unpickles objects or runs code
from a repository. A damaged or wrong file is a ``DamagedFileError`` naming it and the fix.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import timm
from timm.models import load_model_config_from_hf

from .. import files
from ..models import NCLModel
from ..models.factory import INPUT_KEYS, CheckpointMismatchError, WeightsUnavailableError, check_trunks_match
from .layout import CONFIG_NAME, LOCAL_FIX, WEIGHTS_NAME, is_ncl_architecture, parse_spec, read_config, read_state_dict

__all__ = ["freeze_trunks", "init_from", "load_model"]


def load_model(
    spec: Union[str, os.PathLike],
    *,
    num_classes: Optional[int] = None,
    experts: Optional[Sequence[int]] = None,
    **kwargs: Any,
) -> NCLModel:
    """Load an NCL model with its weights.

    Args:
        spec: ``"hf-hub:ORG/NAME[@REV]"``, ``"local-dir:PATH"``, a folder path, or a registered model name
            (``"ncl_resnet32_cifar10lt.expert"``; its pretrained weights).
        num_classes: C of the returned model; when it differs from the saved one the trunks are kept and the
            heads re-initialised (timm drops ``pretrained_cfg['classifier']``).
        experts: keep only these experts (indices into the saved model), e.g. ``[0, 2]``.
        **kwargs: passed to ``timm.create_model`` (``cache_dir``, ``moco``, ``drop_rate``, ...).

    A plain-timm export (architecture is a timm model, not NCL) loads as a 1-expert NCLModel over that backbone:
    ``timm.create_model`` builds the exported classifier, whose classifier becomes the head when C is unchanged.

    Raises:
        WeightsUnavailableError: the Hub repo (or its weights) cannot be fetched.
        CheckpointMismatchError: the folder is not an NCL or timm export.
    """
    source, location = parse_spec(spec)
    if source == "name":
        try:
            model = timm.create_model(location, pretrained=True, num_classes=num_classes, **kwargs)
        except RuntimeError as e:
            if isinstance(e, WeightsUnavailableError) or "No pretrained weights" not in str(e):
                raise
            raise WeightsUnavailableError(
                f"{location!r} has no published weights. Load a local export instead: "
                f"ncl_hub.hub.load_model('local-dir:/path/to/export'), or "
                f"timm.create_model('local-dir:/path/to/export', pretrained=True)."
            ) from e
        return _after_load(model, experts)
    hub_cfg, where = read_config(source, location, kwargs.get("cache_dir"))
    arch = hub_cfg.get("architecture")
    if is_ncl_architecture(arch):
        saved_counts = (hub_cfg.get("ncl") or {}).get("class_counts")
        if saved_counts and "class_counts" not in (hub_cfg.get("model_args") or {}) and num_classes in (
                None, hub_cfg.get("num_classes")):  # an export from before model_args held the counts
            kwargs.setdefault("class_counts", saved_counts)
        model = timm.create_model(f"{source}:{location}", pretrained=True, num_classes=num_classes, **kwargs)
        return _after_load(model, experts)
    if arch and timm.is_model(arch):
        if experts is not None and list(experts) != [0]:
            raise ValueError(f"{where} is a single plain timm model (one expert); experts={list(experts)} is invalid")
        return _after_load(_load_plain_timm(source, location, where, num_classes, kwargs), None)
    raise CheckpointMismatchError(
        f"{where} is not an NCL or timm export: config.json architecture {arch!r} is not a registered timm model"
        + ("" if arch else " (no 'architecture' key)") + "."
    )


def _after_load(model: NCLModel, experts: Optional[Sequence[int]]) -> NCLModel:
    if not isinstance(model, NCLModel):
        raise CheckpointMismatchError(f"loaded a {type(model).__name__}, not an NCLModel")
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    if cfg.get("num_classes") != model.num_classes:  # new heads: the saved labels no longer apply
        for key in ("label_names", "label_descriptions"):
            cfg.pop(key, None)
        cfg["num_classes"] = model.num_classes
        model.pretrained_cfg = model.default_cfg = cfg
    if experts is not None and list(experts) != list(range(model.num_experts)):
        model = model.subset(experts)
    return model


def _load_plain_timm(source: str, location: str, where: str, num_classes: Optional[int],
                     kwargs: Dict[str, Any]) -> NCLModel:
    """A plain-timm export as a 1-expert NCLModel: timm rebuilds the exported classifier from its config.json
    (``load_model_config_from_hf``, or :func:`_local_model_config`), the checked weights fill it, and the NCL
    model adopts it."""
    kwargs = dict(kwargs)
    cache_dir = kwargs.pop("cache_dir", None)
    if source == "hf-hub":
        pretrained_cfg, arch, model_args = load_model_config_from_hf(location, cache_dir=cache_dir)
    else:
        pretrained_cfg, arch, model_args = _local_model_config(location)
    model_args = dict(model_args)
    saved_classes = int(model_args.pop("num_classes", pretrained_cfg.get("num_classes", 0)) or 0)
    in_chans = model_args.pop("in_chans", 3)
    plain = timm.create_model(arch, num_classes=saved_classes, in_chans=in_chans, **model_args)
    try:
        plain.load_state_dict(read_state_dict(source, location, cache_dir), strict=True)
    except RuntimeError as e:
        raise CheckpointMismatchError(f"{where}: its {arch!r} weights do not fit the model ({e})") from e
    target = saved_classes if num_classes is None else num_classes
    overlay = {k: pretrained_cfg[k] for k in INPUT_KEYS if k in pretrained_cfg}
    if target == saved_classes and pretrained_cfg.get("label_names"):
        overlay["label_names"] = pretrained_cfg["label_names"]
    overlay.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
    model = timm.create_model("ncl", backbone=arch, num_classes=target, num_experts=1, classifier="linear",
                              in_chans=in_chans, pretrained_cfg_overlay=overlay, **{**model_args, **kwargs})
    return model.adopt_experts([plain])


def _local_model_config(folder: str) -> Tuple[Dict[str, Any], str, Dict[str, Any]]:
    """(pretrained_cfg, architecture, model_args) of a local export's config.json, as timm's
    ``load_model_config_from_path`` gives them for ``local-dir:`` names. That function is not exported by
    ``timm.models`` (it lives in the private ``timm.models._hub``), so this is the one place that parses the layout
    ``save_for_hf`` writes (and timm's older single-dict layout); the file is read and checked by ``ncl_hub.files``."""
    cfg = files.read_json(Path(folder) / CONFIG_NAME, fix=LOCAL_FIX)
    if "pretrained_cfg" not in cfg:  # the older layout: one dict with the architecture inside
        pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "num_features")}
        if "labels" in pretrained_cfg:
            pretrained_cfg["label_names"] = pretrained_cfg.pop("labels")
        arch, model_args = cfg["architecture"], {}
    else:
        pretrained_cfg, arch = dict(cfg["pretrained_cfg"]), cfg["architecture"]
        model_args = dict(cfg.get("model_args") or {})
        pretrained_cfg.update({k: cfg[k] for k in ("num_classes", "label_names", "label_descriptions") if k in cfg})
    pretrained_cfg.update(file=str(folder), source="local-dir")
    return pretrained_cfg, arch, model_args


def init_from(
    model: NCLModel,
    spec: Union[str, os.PathLike],
    *,
    experts: Optional[Sequence[int]] = None,
    load_heads: bool = False,
) -> NCLModel:
    """Copy an export's trunks (and optionally heads) into an already built model, for fine-tuning.

    Args:
        model: the target NCLModel (its K, C, classifier and MoCo branch are kept).
        spec: an NCL or plain-timm export: ``"hf-hub:ORG/NAME"``, ``"local-dir:PATH"``, a folder, or a registered
            model name with published weights.
        experts: which of the checkpoint's experts fill the model's K slots, in order (default: the first K).
        load_heads: also copy the heads, when classifier type and shapes match (otherwise a warning).

    Returns:
        ``model``, with its momentum encoders reset to the new trunks.

    Raises:
        CheckpointMismatchError: another backbone, too few experts, other tensor shapes, or not an NCL/timm export.
    """
    source = load_model(spec)
    where = f"'{WEIGHTS_NAME}' of {spec}"
    if source.backbone != model.backbone:
        raise CheckpointMismatchError(
            f"{spec} was trained with backbone {source.backbone!r}, but this model's backbone is {model.backbone!r}. "
            f"Build the model with backbone={source.backbone!r} (the export's config.json model_args) to initialise "
            "from it.")
    experts = list(range(model.num_experts)) if experts is None else [int(i) for i in experts]
    if len(experts) != model.num_experts:
        raise ValueError(f"experts={experts} must name one checkpoint expert per model expert (K={model.num_experts})")
    if any(not 0 <= i < source.num_experts for i in experts):
        raise CheckpointMismatchError(
            f"{spec} has {source.num_experts} expert(s); cannot take experts {experts} for a model with "
            f"K={model.num_experts}. Pass experts= with indices below {source.num_experts} (repeating one is allowed) "
            "or build the model with fewer experts.")
    trunks = {f"trunks.{slot}.{k}": v for slot, src in enumerate(experts)
              for k, v in source.trunks[src].state_dict().items()}
    check_trunks_match(trunks, model, source=where)
    model.trunks.load_state_dict({k[len("trunks."):]: v for k, v in trunks.items()}, strict=True)
    if load_heads:
        _copy_heads(model, source, experts, where)
    model.reset_momentum_encoders()
    return model


def _copy_heads(model: NCLModel, source: NCLModel, experts: Sequence[int], where: str) -> None:
    heads = [source.heads[src].state_dict() for src in experts]
    own = [head.state_dict() for head in model.heads]
    fits = source.classifier == model.classifier and all(
        a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a) for a, b in zip(own, heads))
    if fits:
        for head, state in zip(model.heads, heads):
            head.load_state_dict(state, strict=True)
        return
    shapes = sorted({tuple(v.shape) for state in heads for v in state.values()})
    warnings.warn(
        f"heads not loaded from {where}: its {source.classifier} heads {shapes} do not match this model's "
        f"{model.classifier} heads {sorted({tuple(v.shape) for state in own for v in state.values()})}; they stay "
        "freshly initialised.", stacklevel=3)


def freeze_trunks(model: NCLModel) -> NCLModel:
    """Stop gradients into every trunk (a linear probe of the heads); returns ``model``.

    Only ``requires_grad`` changes. BatchNorm running statistics of the trunks still update in ``model.train()``;
    put the trunks in eval mode after each ``model.train()`` call (``for t in model.trunks: t.train(False)``) to keep
    them fixed too. The MoCo key encoders already hold no gradient; their query projections are left trainable.
    """
    for p in model.trunks.parameters():
        p.requires_grad_(False)
    return model
