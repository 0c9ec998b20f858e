"""timm registration of NCL models: the generic ``ncl`` entrypoint and the paper's named models.

``import ncl_hub`` registers everything here, after which::

    timm.create_model("ncl", backbone="convnext_tiny", num_classes=10)
    timm.create_model("ncl_resnet50_imagenetlt", pretrained=True)          # ensemble (default tag)
    timm.create_model("ncl_resnet50_imagenetlt.expert", pretrained=True)   # best single expert
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model

from .. import files
from ..errors import UserError
from ..config import MocoConfig
from .ncl import NCLModel, classifier_names
from .normalization import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

__all__ = ["create_model", "HUB_ORG", "PAPER_MODELS", "INPUT_KEYS", "WeightsUnavailableError",
           "CheckpointMismatchError", "check_trunks_match", "structure_cfg", "trunk_input_cfg"]

_logger = logging.getLogger(__name__)

HUB_ORG = "ncl-hub"
# the backbone-independent part of a pretrained_cfg that an NCL model copies from its trunk
INPUT_KEYS = ("input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation",
               "crop_pct", "test_crop_pct", "crop_mode", "mean", "std", "pool_size", "test_pool_size")


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights could not be fetched (no network, or not published yet)."""


# Paper settings (section 4.2 and the released configs, see REFERENCE.md): architecture of each named
# model. Training hyper-parameters live in recipes/configs.
PAPER_MODELS: Dict[str, Dict[str, Any]] = {
    "ncl_resnet32_cifar10lt": dict(backbone="resnet32_cifar", num_classes=10, classifier="linear"),
    "ncl_resnet32_cifar100lt": dict(backbone="resnet32_cifar", num_classes=100, classifier="linear"),
    "ncl_resnet50_imagenetlt": dict(backbone="resnet50", num_classes=1000, classifier="cosine", cosine_scale=16.0),
    "ncl_resnext50_32x4d_imagenetlt": dict(
        backbone="resnext50_32x4d", num_classes=1000, classifier="cosine", cosine_scale=16.0),
    "ncl_resnet152_placeslt": dict(backbone="resnet152", num_classes=365, classifier="cosine", cosine_scale=16.0),
    "ncl_resnet50_inat2018": dict(backbone="resnet50", num_classes=8142, classifier="cosine", cosine_scale=32.0),
    # tiny variant for tests: 3 experts over an 8-layer CIFAR ResNet
    "ncl_tiny_test": dict(backbone="resnet8_cifar_tiny", num_classes=10, classifier="linear"),
}


def trunk_input_cfg(backbone: str) -> Dict[str, Any]:
    """The input pipeline (size, mean, std, crop, ...) of a backbone's own pretrained_cfg."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None:
        return {}
    cfg = cfg.to_dict(remove_source=True, remove_null=True)
    return {k: cfg[k] for k in INPUT_KEYS if k in cfg}


def structure_cfg(backbone: str, num_experts: int) -> Dict[str, Any]:
    """classifier/first_conv names of a K-expert model, from the trunk's pretrained_cfg."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    first = getattr(cfg, "first_conv", None) if cfg is not None else None
    if isinstance(first, str):
        first = (first,)
    return dict(
        classifier=classifier_names(num_experts),
        first_conv=tuple(f"trunks.{k}.{f}" for k in range(num_experts) for f in first) if first else None,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "classifier": classifier_names(3),
        "license": "apache-2.0", "paper_ids": "arXiv:2203.15359",
        "paper_name": "Nested Collaborative Learning for Long-Tailed Visual Recognition",
        "origin_url": "https://github.com/Bazinga699/NCL", **kwargs,
    }


def _named_cfgs(name: str, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """The ensemble (default) and single-expert tags of a named model, pointing to their Hub repos."""
    return {
        f"{name}.ensemble": _cfg(hf_hub_id=f"{HUB_ORG}/{name}", num_classes=PAPER_MODELS[name]["num_classes"],
                                 **kwargs),
        f"{name}.expert": _cfg(hf_hub_id=f"{HUB_ORG}/{name}-expert", num_classes=PAPER_MODELS[name]["num_classes"],
                               classifier=classifier_names(1), **kwargs),
    }


_CIFAR10 = dict(input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
_CIFAR100 = dict(input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR100_MEAN, std=CIFAR100_STD)
default_cfgs = generate_default_cfgs({
    "ncl": _cfg(),
    **_named_cfgs("ncl_resnet32_cifar10lt", **_CIFAR10),
    **_named_cfgs("ncl_resnet32_cifar100lt", **_CIFAR100),
    **_named_cfgs("ncl_resnet50_imagenetlt"),
    **_named_cfgs("ncl_resnext50_32x4d_imagenetlt"),
    **_named_cfgs("ncl_resnet152_placeslt"),
    **_named_cfgs("ncl_resnet50_inat2018"),
    "ncl_tiny_test": _cfg(**_CIFAR10, num_classes=10),
})


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's trunks do not fit the model (another backbone, expert count or width)."""


def check_trunks_match(state_dict: Dict[str, torch.Tensor], model: NCLModel, source: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError unless ``state_dict`` holds exactly ``model``'s trunk tensors."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith("trunks.")}
    theirs = {k: v for k, v in state_dict.items() if k.startswith("trunks.")}
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = sorted(k for k in set(own) & set(theirs) if tuple(own[k].shape) != tuple(theirs[k].shape))
    if not (missing or unexpected or shapes):
        return
    experts = {k.split(".")[1] for k in theirs}
    detail = []
    if not theirs:
        detail.append("it holds no NCL trunks ('trunks.K.*' keys): is it an NCL model at all?")
    if missing:
        detail.append(f"{len(missing)} trunk tensors missing (e.g. {missing[:3]})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected trunk tensors (e.g. {unexpected[:3]})")
    if shapes:
        k = shapes[0]
        detail.append(f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(theirs[k].shape)} vs {tuple(own[k].shape)})")
    raise CheckpointMismatchError(
        f"{source} does not match this model (backbone {model.backbone!r}, {model.num_experts} experts); the "
        f"checkpoint has {len(experts)} expert(s). " + "; ".join(detail) + ". Build the model with the "
        "checkpoint's backbone and expert count (its config.json model_args), or select experts with "
        "NCLModel.subset()."
    )


def _filter_state_dict(state_dict: Dict[str, torch.Tensor], model: NCLModel,
                       source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Make an NCL checkpoint fit ``model``: unwrap training checkpoints, drop or fill the MoCo branch,
    and refuse trunks that do not match (timm loads non-strictly when the class count changes)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    if any(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    check_trunks_match(state_dict, model, source=source)
    own = model.state_dict()
    out = {k: v for k, v in state_dict.items() if not k.startswith("moco.") or k in own}
    # a checkpoint without MoCo loads into a model with one: the branch is re-derived from the trunks
    for k, v in own.items():
        if k.startswith("moco.") and k not in out:
            out[k] = v
    return out


def _read_local_weights(cfg: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], str]:
    """The state dict a ``local-dir:`` folder or a ``file=`` override names, read by ``ncl_hub.files`` (a damaged
    file is a DamagedFileError naming it), and the file's path."""
    location = Path(cfg["file"])
    path = files.find_weights(location) if location.is_dir() else location
    if path is None or not path.is_file():
        raise WeightsUnavailableError(f"no weights at '{location}': expected "
                                      f"{' or '.join(files.WEIGHT_FILES) if location.is_dir() else 'that file'}")
    fix = ("Copy or download it again, or export the model again (ncl_hub.hub.save_pretrained)."
           if location.is_dir() else "Give the path of a complete safetensors (or torch.save) weight file.")
    return files.read_weights(path, fix=fix), str(path)


def _load_weights(model: NCLModel, cache_dir: Optional[str] = None, strict: bool = True) -> None:
    cfg = dict(model.pretrained_cfg)
    source, hub_id = cfg.get("source"), cfg.get("hf_hub_id")
    where = "checkpoint"
    if cfg.get("state_dict") is None and cfg.get("file") and source in (None, "", "local-dir"):
        state_dict, where = _read_local_weights(cfg)
        cfg = dict(cfg, source=None, file=None, state_dict=state_dict)
    elif cfg.get("state_dict") is None and hub_id and source in (None, "", "hf-hub"):
        filename = cfg.get("hf_hub_filename") or "model.safetensors"
        fix = "Export and upload the model again."
        try:
            state_dict = files.fetch_hub_file(hub_id, filename, lambda p: files.read_weights(p, fix=fix),
                                              cache_dir=cache_dir)
        except files.DamagedFileError:
            raise
        except Exception as e:  # offline, unpublished repo, or a network failure
            arch = cfg.get("architecture", "ncl")
            raise WeightsUnavailableError(
                f"pretrained weights for {arch!r} could not be loaded from the Hugging Face Hub repo "
                f"'{hub_id}' ({type(e).__name__}: {e}). If you are offline or the weights are not "
                f"published yet, load a local export instead: "
                f"timm.create_model('local-dir:/path/to/export', pretrained=True), or "
                f"timm.create_model('{arch}', pretrained=True, "
                f"pretrained_cfg_overlay=dict(file='/path/to/model.safetensors'))."
            ) from e
        cfg = dict(cfg, source=None, state_dict=state_dict)
        where = f"'{filename}' of Hub repo '{hub_id}'"
    try:
        load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=model.in_chans,
                        filter_fn=functools.partial(_filter_state_dict, source=where), strict=strict,
                        cache_dir=cache_dir)
    except RuntimeError as e:  # load_state_dict: missing or unexpected keys, shape mismatches of the heads
        if isinstance(e, WeightsUnavailableError) or cfg.get("state_dict") is None:  # timm's "no weights", ...
            raise
        raise CheckpointMismatchError(
            f"the weights in {where} do not fit the model its config describes ({_load_error_summary(e)}). The "
            "weights and config.json come from different models: export the model again, or build it with the "
            "weights' own architecture."
        ) from e


def _load_error_summary(error: Exception, shown: int = 2) -> str:
    """The first problems of a ``load_state_dict`` error on one line (torch lists every tensor, one per line)."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    details = [line for line in lines[1:] if line] or lines[:1]
    more = f"; and {len(details) - shown} more" if len(details) > shown else ""
    return "; ".join(details[:shown]) + more


_CLASS_INFO_ARGS = ("class_counts", "class_prior", "prior_strength", "prior_estimate", "calibration")


def _drop_saved_class_info(kwargs: Dict[str, Any]) -> None:
    """An export's class counts and class prior describe its C classes: when the caller asks for another
    ``num_classes`` (new heads), drop the ones that came from the export's config.json (timm passes its model_args
    as ``pretrained_model_args`` and as defaults of ``kwargs``); ones the caller passed stay, and are checked."""
    saved = kwargs.get("pretrained_model_args") or {}
    if "num_classes" not in saved or kwargs.get("num_classes", saved["num_classes"]) == saved["num_classes"]:
        return
    for key in _CLASS_INFO_ARGS:
        if key in saved and key in kwargs and kwargs[key] is saved[key]:
            del kwargs[key]


def _create_ncl(variant: str, pretrained: bool = False, **kwargs: Any) -> NCLModel:
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    cache_dir = kwargs.pop("cache_dir", None)
    kwargs.pop("pretrained_strict", None)
    _drop_saved_class_info(kwargs)
    backbone = kwargs.get("backbone")
    if not backbone:
        raise ValueError(f"{variant!r} needs a backbone, e.g. timm.create_model('ncl', backbone='resnet50', ...)")
    if isinstance(pretrained_cfg, str) and pretrained_cfg.startswith("expert"):
        kwargs.setdefault("num_experts", 1)
    num_experts = kwargs.setdefault("num_experts", 3)
    if not isinstance(pretrained_cfg, dict) and variant == "ncl":
        # the generic entrypoint takes its input pipeline from the backbone's own pretrained_cfg
        overlay = {**trunk_input_cfg(backbone), "num_classes": kwargs.get("num_classes", 1000), **overlay}
    overlay = {**structure_cfg(backbone, num_experts), **overlay}
    model = build_model_with_cfg(
        NCLModel, variant, pretrained=False, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay,
        **kwargs,
    )
    if pretrained:
        _load_weights(model, cache_dir=cache_dir)
    model.reset_momentum_encoders()
    return model


def _named(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> NCLModel:
    return _create_ncl(variant, pretrained, **dict(PAPER_MODELS[variant], **kwargs))


@register_model
def ncl(pretrained: bool = False, **kwargs: Any) -> NCLModel:
    """NCL over any timm backbone: ``timm.create_model('ncl', backbone='convnext_tiny', num_classes=10)``."""
    return _create_ncl("ncl", pretrained, **kwargs)


@register_model
def ncl_resnet32_cifar10lt(pretrained: bool = False, **kwargs: Any) -> NCLModel:
    """NCL, 3 x ResNet-32, linear heads, CIFAR-10-LT (paper Table 1)."""
    return _named("ncl_resnet32_cifar10lt", pretrained, kwargs)


@register_model
def ncl_resnet32_cifar100lt(pretrained: bool = False, **kwargs: Any) -> NCLModel:
    """NCL, 3 x ResNet-32, linear heads, CIFAR-100-LT (paper Table 1)."""
    return _named("ncl_resnet32_cifar100lt", pretrained, kwargs)


@register_model
def ncl_resnet50_imagenetlt(pretrained: bool = False, **kwargs: Any) -> NCLModel:
    """NCL, 3 x ResNet-50, cosine heads (s = 16), ImageNet-LT (paper Table 2)."""
    return _named("ncl_resnet50_imagenetlt", pretrained, kwargs)


@register_model
def ncl_resnext50_32x4d_imagenetlt(pretrained: bool = False, **kwargs: Any) -> NCLModel:
    """NCL, 3 x ResNeXt-50 32x4d, cosine heads (s = 16), ImageNet-LT (paper Table 2)."""
    return _named("ncl_resnext50_32x4d_imagenetlt", pretrained, kwargs)


@register_model
def ncl_resnet152_placeslt(pretrained: bool = False, **kwargs: Any) -> NCLModel:
    """NCL, 3 x ResNet-152 (ImageNet-pretrained for training), cosine heads (s = 16), Places-LT."""
    return _named("ncl_resnet152_placeslt", pretrained, kwargs)


@register_model
def ncl_resnet50_inat2018(pretrained: bool = False, **kwargs: Any) -> NCLModel:
    """NCL, 3 x ResNet-50, cosine heads (s = 32), iNaturalist 2018 (paper Table 3)."""
    return _named("ncl_resnet50_inat2018", pretrained, kwargs)


@register_model
def ncl_tiny_test(pretrained: bool = False, **kwargs: Any) -> NCLModel:
    """3 x an 8-layer CIFAR ResNet (8/16/32 channels): for fast tests."""
    return _named("ncl_tiny_test", pretrained, kwargs)


def create_model(
    backbone: str,
    *,
    num_classes: int,
    num_experts: int = 3,
    classifier: str = "linear",
    cosine_scale: float = 16.0,
    moco: Union[None, dict, MocoConfig] = None,
    pretrained_backbone: bool = False,
    **backbone_kwargs: Any,
) -> NCLModel:
    """Build an NCL model over a timm backbone (same as ``timm.create_model('ncl', backbone=...)``).

    Args:
        backbone: any timm model name.
        num_classes: C.
        num_experts: K.
        classifier: ``"linear"`` or ``"cosine"``.
        cosine_scale: s of the cosine classifier.
        moco: MoCo-v2 branch (training only), or None.
        pretrained_backbone: start the trunks from timm's pretrained weights for ``backbone``.
        **backbone_kwargs: passed to each trunk's ``timm.create_model``.

    Returns:
        an :class:`NCLModel` with ``pretrained_cfg`` resolved from the backbone.
    """
    return timm.create_model(
        "ncl", backbone=backbone, num_classes=num_classes, num_experts=num_experts, classifier=classifier,
        cosine_scale=cosine_scale, moco=moco, pretrained_backbone=pretrained_backbone, **backbone_kwargs,
    )
