"""Writing exports in timm's Hub layout, in two formats, both with timm's own writer (``save_for_hf``):

* NCL (:func:`save_pretrained`): the ensemble or one expert as ``architecture: "ncl"``; once ``ncl_hub`` is imported,
  ``timm.create_model('hf-hub:ORG/NAME' or 'local-dir:PATH', pretrained=True)`` rebuilds it with its weights.
* plain timm (:func:`export_timm`): one expert as the timm model of its backbone, which loads without ncl_hub.

Both write the model that their config.json rebuilds, the NCL fields under ``model_config`` (config.json's ``ncl``
section), the model card, the training config and the plots, into a folder that replaces the old one only once
everything is written.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import timm
from timm.models import model_entrypoint, save_for_hf

from .. import files
from ..models import NCLModel
from ..models.factory import INPUT_KEYS, trunk_input_cfg
from ..version import __version__
from .card import render_model_card
from .layout import CONFIG_NAME, TRAINING_CONFIG_NAME, VARIANTS, check_json_args, is_native_timm

__all__ = ["export_timm", "save_pretrained"]


def save_pretrained(
    model: NCLModel,
    folder: Union[str, Path],
    *,
    variant: str = "ensemble",
    expert_index: Optional[int] = None,
    metrics: Optional[dict] = None,
    config: Optional[dict] = None,
    class_names: Optional[Sequence[str]] = None,
    class_counts: Optional[Sequence[int]] = None,
    plots_dir: Optional[Union[str, Path]] = None,
    command: Optional[str] = None,
    repo_id: Optional[str] = None,
    run_info: Optional[dict] = None,
) -> Path:
    """Write ``model`` (the ensemble, or one expert) in timm's Hub layout, atomically.

    Args:
        model: the trained NCLModel (K experts; a MoCo branch is dropped).
        folder: target folder; replaced as a whole only once everything is written.
        variant: ``"ensemble"`` (all K experts, mean of logits) or ``"expert"`` (one expert, K = 1).
        expert_index: the expert to save for ``"expert"``; default ``metrics['selected_expert']``.
        metrics: eval/metrics.json content, for the card and its ``model-index``.
        config: resolved training config, written as training_config.yaml.
        class_names: C label names (config.json ``label_names``).
        class_counts: C training-image counts.
        plots_dir: folder whose ``*.png`` are copied next to the card.
        command: the training command line, for the card.
        repo_id: the Hub repo the card's usage code points to.
        run_info: run_info.json content (best epoch, wall time, dataset...), for the card.

    Returns:
        the export folder.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    metrics, run_info = metrics or {}, run_info or {}
    class_counts = next((c for c in (class_counts, model.class_counts, metrics.get("class_counts")) if c is not None),
                        None)
    _check_class_info(model.num_classes, class_names, class_counts)
    if model.class_counts is not None and [int(c) for c in class_counts] != [int(c) for c in model.class_counts]:
        raise ValueError("class_counts differ from the model's own (model.class_counts), which its class prior "
                         "may use; pass the model's counts or none")
    source_k = _source_num_experts(model, metrics)
    saved = model
    if variant == "expert":
        expert_index = resolve_expert_index(expert_index, metrics, run_info)
        if not 0 <= expert_index < source_k:
            raise ValueError(f"expert_index {expert_index} out of range for K={source_k}")
        saved = model.expert(expert_index) if model.num_experts > 1 else model
    args = saved.model_args()
    if class_counts is not None:  # the training counts: what class_prior="train" means after a reload
        args["class_counts"] = [int(c) for c in class_counts]
    check_json_args(args)
    rebuilt = _rebuild(saved, args)
    selected = metrics.get("selected_expert", run_info.get("selected_expert"))
    ncl = _ncl_section(rebuilt, fmt="ncl", variant=variant, expert_index=expert_index if variant == "expert" else None,
                       selected_expert=selected, source_num_experts=source_k, num_params=rebuilt.num_inference_params(),
                       class_counts=class_counts)
    return _write_export(rebuilt, Path(folder), ncl=ncl, class_names=class_names, model_args=args,
                         card=dict(metrics=metrics, training_config=config, run_info=run_info, command=command,
                                   repo_id=repo_id), plots_dir=plots_dir)


def _rebuild(model: NCLModel, args: Dict[str, Any]) -> NCLModel:
    """``timm.create_model('ncl', **args)`` holding ``model``'s inference weights: exactly the model the export's
    config.json rebuilds (no MoCo branch), with ``model``'s input pipeline."""
    overlay = {k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items() if k in INPUT_KEYS}
    with torch.random.fork_rng(devices=[]):  # initialising it must not move the caller's RNG (a run saves best/)
        rebuilt = timm.create_model("ncl", pretrained_cfg_overlay=dict(overlay, tag=None), **args)
    rebuilt.load_state_dict(model.inference_state_dict(), strict=True)
    return rebuilt.train(False)


def export_timm(
    model: NCLModel,
    folder: Union[str, Path],
    *,
    expert_index: int = 0,
    class_names: Optional[Sequence[str]] = None,
    class_counts: Optional[Sequence[int]] = None,
    metrics: Optional[dict] = None,
    config: Optional[dict] = None,
    plots_dir: Optional[Union[str, Path]] = None,
    command: Optional[str] = None,
    repo_id: Optional[str] = None,
    run_info: Optional[dict] = None,
) -> Path:
    """Write expert ``expert_index`` as a plain timm model, loadable with no ncl_hub install.

    Only possible when the trunk is a native timm architecture (registered by timm itself) and the head is linear:
    the expert becomes ``timm.create_model(model.backbone, num_classes=C)`` with the trunk's weights and the head
    in its ``get_classifier()``. Outputs are checked against the expert's before saving with timm's
    ``save_for_hf(..., safe_serialization=True)``.

    Raises:
        ValueError: a cosine head, a trunk registered outside timm (e.g. ncl_hub's ``resnet32_cifar``), or a class
            prior (``NCLModel.set_class_prior``), which a plain timm model would not apply.
    """
    _check_plain_exportable(model, expert_index)
    metrics, run_info = metrics or {}, run_info or {}
    class_counts = class_counts if class_counts is not None else metrics.get("class_counts")
    _check_class_info(model.num_classes, class_names, class_counts)
    plain = _plain_expert(model, expert_index)
    src_cfg = _input_cfg(model)
    data_config = {k: src_cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                   if k in src_cfg}
    selected = metrics.get("selected_expert", run_info.get("selected_expert"))
    ncl = _ncl_section(model, fmt="timm", variant="expert", expert_index=expert_index, selected_expert=selected,
                       source_num_experts=model.num_experts, num_params=sum(p.numel() for p in plain.parameters()),
                       class_counts=class_counts)
    return _write_export(plain, Path(folder), ncl=ncl, class_names=class_names, data_config=data_config,
                         card=dict(metrics=metrics, training_config=config, run_info=run_info, command=command,
                                   repo_id=repo_id), plots_dir=plots_dir)


def _check_plain_exportable(model: NCLModel, expert_index: int) -> None:
    if model.class_prior is not None:
        raise ValueError(
            "cannot export a plain timm model with a class prior: timm alone would not add it to the logits. Use "
            "the NCL format (ncl_hub.hub.save_pretrained), which keeps it, or model.set_class_prior(None) first.")
    backbone = model.backbone
    if not is_native_timm(backbone):
        module = model_entrypoint(backbone).__module__ if timm.is_model(backbone) else "nowhere"
        raise ValueError(
            f"cannot export a plain timm model: the trunk {backbone!r} is registered by {module}, not by timm, so "
            f"timm alone could not rebuild it. Use the NCL format (ncl_hub.hub.save_pretrained / --format ncl), "
            f"which loads with `import ncl_hub`.")
    if not 0 <= expert_index < model.num_experts:
        raise ValueError(f"expert_index {expert_index} out of range for K={model.num_experts}")
    head = model.heads[expert_index]
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"cannot export a plain timm model: expert {expert_index} has a {type(head).__name__} head "
            f"({model.classifier} classifier), and timm classifiers are linear layers. Use the NCL format "
            f"(ncl_hub.hub.save_pretrained / --format ncl).")


def _plain_expert(model: NCLModel, expert_index: int) -> nn.Module:
    """``timm.create_model(backbone, num_classes=C)`` holding expert ``expert_index``'s trunk and head, checked to
    give the expert's logits; on the CPU, in eval mode."""
    backbone, head, trunk = model.backbone, model.heads[expert_index], model.trunks[expert_index]
    with torch.random.fork_rng(devices=[]):  # initialising it must not move the caller's RNG
        plain = timm.create_model(backbone, num_classes=model.num_classes, in_chans=model.in_chans,
                                  **model.backbone_kwargs)
    result = plain.load_state_dict(trunk.state_dict(), strict=False)
    classifier = plain.get_classifier()
    head_params = {id(p) for p in classifier.parameters()}
    head_keys = {n for n, p in plain.named_parameters() if id(p) in head_params}
    if result.unexpected_keys or set(result.missing_keys) - head_keys:
        raise ValueError(f"the trunk's weights do not fit a plain {backbone!r}: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    if not isinstance(classifier, nn.Linear) or classifier.weight.shape != head.weight.shape:
        raise ValueError(f"{backbone!r}'s classifier ({type(classifier).__name__}) cannot hold the expert's "
                         f"linear head {tuple(head.weight.shape)}")
    classifier.load_state_dict(head.state_dict())
    param = next(model.parameters())
    plain = plain.to(param.device).train(False)
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            x = torch.randn(2, *_input_cfg(model)["input_size"], generator=torch.Generator().manual_seed(0))
            x = x.to(device=param.device, dtype=param.dtype)
            want, got = head(trunk(x)), plain(x)
    finally:
        model.train(was_training)
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"plain timm {backbone!r} does not reproduce expert {expert_index}: max abs diff "
                           f"{(got - want).abs().max().item():.3g}")
    plain = plain.cpu()
    # timm's own cfg names the pretrained tag of timm's weights, which these are not
    plain.pretrained_cfg = plain.default_cfg = dict(plain.pretrained_cfg, tag=None)
    return plain


def _input_cfg(model: NCLModel) -> Dict[str, Any]:
    """The model's input pipeline (the trunk's own, overridden by the model's pretrained_cfg), C channels."""
    own = getattr(model, "pretrained_cfg", None) or {}
    cfg = {**trunk_input_cfg(model.backbone), **{k: v for k, v in own.items() if k in INPUT_KEYS}}
    cfg["input_size"] = (model.in_chans, *tuple(cfg.get("input_size", (3, 224, 224)))[1:])
    return cfg


def _write_export(model: nn.Module, folder: Path, *, ncl: Dict[str, Any], class_names: Optional[Sequence[str]],
                  card: Dict[str, Any], plots_dir, model_args: Optional[Dict[str, Any]] = None,
                  data_config: Optional[Dict[str, Any]] = None) -> Path:
    """Weights and config.json with timm's ``save_for_hf`` (the ``ncl`` section and the label names under
    ``model_config``), then training_config.yaml, the plots and the card (``card``: render_model_card's records),
    into a temporary folder that replaces ``folder`` once complete."""
    model_config: Dict[str, Any] = {"ncl": ncl}
    if class_names is not None:
        model_config["label_names"] = list(class_names)
    card = dict(card, metrics=card["metrics"] or None, run_info=card["run_info"] or None)  # none recorded
    with files.atomic_folder(folder) as tmp:
        save_for_hf(model, str(tmp), model_config=model_config, model_args=model_args, safe_serialization=True,
                    data_config=data_config)
        plots = _write_extras(tmp, config=card["training_config"], plots_dir=plots_dir)
        text = render_model_card(files.read_json(tmp / CONFIG_NAME), plots=plots, folder_name=folder.name, **card)
        (tmp / "README.md").write_text(text, encoding="utf-8")
    return folder


def _write_extras(folder: Path, *, config: Optional[dict], plots_dir: Optional[Union[str, Path]]) -> List[str]:
    """training_config.yaml and the evaluation PNGs; returns the PNG names."""
    if config is not None:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        (folder / TRAINING_CONFIG_NAME).write_text(text, encoding="utf-8")
    plots = []
    if plots_dir is not None and Path(plots_dir).is_dir():
        for png in sorted(Path(plots_dir).glob("*.png")):
            shutil.copy2(png, folder / png.name)
            plots.append(png.name)
    return plots


def _ncl_section(model: NCLModel, *, fmt: str, variant: str, expert_index: Optional[int],
                 selected_expert: Optional[int], source_num_experts: int, num_params: int,
                 class_counts: Optional[Sequence[int]]) -> Dict[str, Any]:
    """config.json's ``ncl`` section: what was exported, from which ensemble (read by the card and by loaders)."""
    return {
        "format": fmt,  # "ncl": loads with `import ncl_hub`; "timm": a plain timm model
        "variant": variant,  # "ensemble" or "expert"
        "expert_index": expert_index,  # index of the saved expert in the source ensemble (variant "expert")
        "selected_expert": selected_expert,  # the expert chosen on the validation split, if known
        "source_num_experts": source_num_experts,  # K of the trained ensemble
        "num_experts": model.num_experts if variant == "ensemble" else 1,
        "backbone": model.backbone,
        "classifier": model.classifier,
        "cosine_scale": model.cosine_scale if model.classifier == "cosine" else None,
        "num_params": num_params,
        "class_counts": [int(c) for c in class_counts] if class_counts is not None else None,
        # the deployment prior its logits are adjusted to (NCLModel.set_class_prior), None: balanced logits
        "class_prior": model.class_prior,
        "prior_strength": model.prior_strength if model.class_prior is not None else None,
        "ncl_hub_version": __version__,
    }


def _check_class_info(num_classes: int, class_names: Optional[Sequence[str]], class_counts: Optional[Sequence[int]]):
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {num_classes} classes")
    if class_counts is not None and len(class_counts) != num_classes:
        raise ValueError(f"{len(class_counts)} class counts for a model with {num_classes} classes")


def resolve_expert_index(expert_index: Optional[int], metrics: dict, run_info: dict) -> int:
    for candidate in (expert_index, metrics.get("selected_expert"), run_info.get("selected_expert")):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        "variant 'expert' needs expert_index, or metrics['selected_expert'] (the expert chosen on the validation split)"
    )


def _source_num_experts(model: NCLModel, metrics: dict) -> int:
    if model.num_experts > 1:
        return model.num_experts
    for split in (metrics.get("splits") or {}).values():
        if isinstance(split, dict) and split.get("experts"):
            return len(split["experts"])
    return 1
