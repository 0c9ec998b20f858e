"""Hugging Face Hub export and import of NCL models.

An export folder uses timm's Hub layout, so that once ``ncl_hub`` is imported
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` and ``timm.create_model('local-dir:PATH', pretrained=True)``
rebuild the model with its weights::

    model.safetensors      inference weights: trunks and heads, never the training-only MoCo branch
    config.json            architecture "ncl", model_args, pretrained_cfg, label_names, and an "ncl" section
    README.md              model card rendered from the package's templates/ncl_model_card.md
    training_config.yaml   the resolved training config (when given)
    *.png                  evaluation plots (when given)

:func:`export_timm` writes one expert as a plain timm model instead (config.json architecture = the trunk), which
loads without ncl_hub. :func:`publish` turns a training output folder into two Hub repos: the ensemble
(``repo_id``) and the expert selected on the validation split (``f"{repo_id}-expert"``).

Weights are read from safetensors (or ``torch.load(weights_only=True)``); nothing here unpickles objects or runs
code from a repository. A damaged or wrong file (truncated, not safetensors, not JSON, ...) is a
``DamagedFileError`` naming it and the fix (``ncl_hub.files``); a damaged Hub download is fetched once more.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import timm
from timm.models import PretrainedCfg, model_entrypoint, split_model_name_tag

from . import files
from .files import DamagedFileError
from .models import factory as _factory
from .models.factory import CheckpointMismatchError, WeightsUnavailableError, check_trunks_match
from .models.ncl import NCLModel

__all__ = [
    "save_pretrained", "export_timm", "publish", "load_model", "init_from", "freeze_trunks", "render_model_card",
    "CheckpointMismatchError", "DamagedFileError", "WeightsUnavailableError",
]

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
TRAINING_CONFIG_NAME = "training_config.yaml"
# package data (ncl_hub/templates/), read with importlib.resources so that a wheel install finds it too;
# model_cards/ncl_model_card.md in the repository is a link to this file
CARD_TEMPLATE = "templates/ncl_model_card.md"


def _card_template() -> str:
    """The text of the model card template shipped inside the package."""
    from importlib.resources import files as package_files

    return package_files("ncl_hub").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")


VARIANTS = ("ensemble", "expert")
FORMATS = ("ncl", "timm")
CARD_TAGS = ["image-classification", "timm", "long-tailed", "ncl", "multi-expert"]

_PRETRAINED_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}
# weight-source keys (the export is the source now), the registry tag, and per-class metadata kept at top level
_DROPPED_CFG_KEYS = {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag",
                     "label_names", "label_descriptions", "label_offset"}
# paper schedule per dataset family (REFERENCE.md), to flag short-schedule numbers in the card
_PAPER_EPOCHS = (("cifar", 400), ("imagenet", 400), ("inat", 400), ("places", 30))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

BIBTEX = """@inproceedings{li2022nested,
  title     = {Nested Collaborative Learning for Long-Tailed Visual Recognition},
  author    = {Li, Jun and Tan, Zichang and Wan, Jun and Lei, Zhen and Guo, Guodong},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022},
  eprint    = {2203.15359},
  archivePrefix = {arXiv}
}"""


# ---------------------------------------------------------------------------------------------- small helpers
@contextlib.contextmanager
def _atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``folder``; on success it replaces ``folder``.

    An exception inside the block removes the temporary folder and leaves an existing ``folder`` untouched. The
    swap is two renames on the same filesystem (old -> backup, new -> folder), then the backup is deleted.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if folder.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        backup.rmdir()
        os.rename(folder, backup)
    os.rename(tmp, folder)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _get(mapping: Optional[dict], dotted: str, default: Any = None) -> Any:
    """``mapping['a']['b']`` for ``'a.b'``, or ``default`` when any level is missing."""
    value: Any = mapping
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return default
        value = value[key]
    return value


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None


def _read_yaml(path: Path) -> Optional[dict]:
    if not Path(path).is_file():
        return None
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _check_json_args(args: Dict[str, Any]) -> None:
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"model argument {key}={value!r} ({type(value).__name__}) is not JSON-serialisable, so config.json "
                f"could not rebuild the model with timm.create_model('hf-hub:...'). Build the model with a plain "
                f"value for {key!r} (a string, number, list or dict that the backbone accepts)."
            ) from e


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 8:  # a token; a stray short value would corrupt the text instead
            text = text.replace(secret, "REDACTED")  # valid inside YAML, JSON and Markdown
    return text


def _is_ncl_architecture(arch: Optional[str]) -> bool:
    if not arch or not timm.is_model(arch):
        return False
    return arch == "ncl" or model_entrypoint(arch).__module__ == _factory.__name__


def _is_native_timm(name: str) -> bool:
    """Registered by timm itself (so a plain timm install can rebuild it), not by ncl_hub or another package."""
    return timm.is_model(name) and model_entrypoint(name).__module__.startswith("timm.")


def _parse_spec(spec: Union[str, os.PathLike]) -> Tuple[str, str]:
    """``("hf-hub", repo_id[@rev])``, ``("local-dir", path)`` or ``("name", timm model name)``."""
    if isinstance(spec, os.PathLike):
        return "local-dir", os.fspath(spec)
    if spec.startswith("hf-hub:"):
        return "hf-hub", spec[len("hf-hub:"):]
    if spec.startswith("local-dir:"):
        return "local-dir", spec[len("local-dir:"):]
    if os.path.isdir(spec):
        return "local-dir", spec
    if timm.is_model(split_model_name_tag(spec)[0]):
        return "name", spec
    raise ValueError(
        f"cannot load {spec!r}: it is not a folder, a registered timm model, 'hf-hub:ORG/NAME' or 'local-dir:PATH'. "
        f"For a Hub repo use 'hf-hub:{spec}'."
    )


def _unavailable(repo_id: str, error: Exception, what: str = "files") -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not fetch the {what} of Hugging Face Hub repo '{repo_id}' ({type(error).__name__}: {error}). "
        f"If you are offline or the repo is not published yet, load a local export instead: "
        f"ncl_hub.hub.load_model('local-dir:/path/to/export') or "
        f"timm.create_model('local-dir:/path/to/export', pretrained=True); a cached download also works with "
        f"HF_HUB_OFFLINE=1."
    )


_LOCAL_FIX = "Copy or download the export again, or export the model again (ncl_hub.hub.save_pretrained)."
_HUB_FIX = "Export and upload the model again."


def _read_hub_config(source: str, location: str, cache_dir: Optional[str] = None) -> Tuple[dict, str]:
    """config.json of an export (downloaded for hf-hub) and a description of where it came from.

    A damaged config.json is a ``files.DamagedFileError`` naming it (a damaged Hub download is fetched again)."""
    if source == "hf-hub":
        try:
            cfg = files.fetch_hub_file(location, CONFIG_NAME, lambda p: files.read_json(p, fix=_HUB_FIX),
                                       cache_dir=cache_dir)
        except files.DamagedFileError:
            raise
        except Exception as e:  # offline, missing repo, network
            raise _unavailable(location, e, "config.json") from e
        return _checked_config(cfg, f"config.json of Hub repo '{location}'"), f"Hub repo '{location}'"
    folder = Path(location)
    if not folder.is_dir():
        raise FileNotFoundError(f"no export folder at '{folder}'")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointMismatchError(
            f"{folder} is not an NCL or timm export: it has no {CONFIG_NAME}. Export with ncl_hub.hub.save_pretrained "
            f"or ncl_hub.hub.export_timm (timm's save_for_hf also works)."
        )
    cfg = files.read_json(folder / CONFIG_NAME, fix=_LOCAL_FIX)
    return _checked_config(cfg, str(folder / CONFIG_NAME)), f"export '{folder}'"


def _checked_config(cfg: dict, where: str) -> dict:
    """An NCL config.json must name its backbone (timm would otherwise fail without naming the file)."""
    if cfg.get("architecture") == "ncl" and not isinstance(_get(cfg, "model_args.backbone"), str):
        raise CheckpointMismatchError(
            f"{where} has architecture 'ncl' but no model_args.backbone (missing keys: it was edited, or written by "
            "another tool). Export the model again with ncl_hub.hub.save_pretrained.")
    return cfg


def _read_state_dict(source: str, location: str, cache_dir: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Weights of an export, from safetensors, or a legacy .bin through ``torch.load(weights_only=True)``.

    A damaged weight file is a ``files.DamagedFileError`` naming it (a damaged Hub download is fetched again)."""
    if source == "hf-hub":
        try:
            return files.fetch_hub_file(location, WEIGHTS_NAME, lambda p: files.read_weights(p, fix=_HUB_FIX),
                                        cache_dir=cache_dir)
        except files.DamagedFileError:
            raise
        except Exception as e:
            raise _unavailable(location, e, f"weights ({WEIGHTS_NAME})") from e
    path = files.find_weights(location)
    if path is None:
        raise WeightsUnavailableError(f"no weights in '{location}': expected {' or '.join(files.WEIGHT_FILES)}")
    return files.read_weights(path, fix=_LOCAL_FIX)


# ---------------------------------------------------------------------------------------------- config.json
def _ncl_pretrained_cfg(model: NCLModel) -> Dict[str, Any]:
    """pretrained_cfg for config.json: input pipeline and classifier/first_conv names of this K; no sources."""
    cfg: Dict[str, Any] = dict(_factory._trunk_input_cfg(model.backbone))
    cfg.update(getattr(model, "pretrained_cfg", None) or {})
    cfg = {k: v for k, v in cfg.items() if k in _PRETRAINED_FIELDS and k not in _DROPPED_CFG_KEYS}
    # recomputed for the saved expert count (a subset keeps its source's first_conv list)
    cfg.update(_factory._structure_cfg(model.backbone, model.num_experts))
    cfg["num_classes"] = model.num_classes
    cfg.setdefault("input_size", (model.in_chans, 224, 224))
    cfg["input_size"] = (model.in_chans, *tuple(cfg["input_size"])[1:])
    return cfg


def _hub_config(
    model: NCLModel,
    *,
    variant: str,
    expert_index: Optional[int],
    selected_expert: Optional[int],
    source_num_experts: int,
    class_names: Optional[Sequence[str]],
    class_counts: Optional[Sequence[int]],
) -> Dict[str, Any]:
    args = model.model_args()
    if class_counts is not None:  # the training counts: what class_prior="train" means after a reload
        args["class_counts"] = [int(c) for c in class_counts]
    _check_json_args(args)
    config: Dict[str, Any] = {
        "architecture": "ncl",
        "num_classes": model.num_classes,
        "num_features": model.num_features,
    }
    if class_names is not None:
        config["label_names"] = list(class_names)
    config["model_args"] = args
    config["pretrained_cfg"] = _ncl_pretrained_cfg(model)
    config["ncl"] = _ncl_section(model, fmt="ncl", variant=variant, expert_index=expert_index,
                                 selected_expert=selected_expert, source_num_experts=source_num_experts,
                                 num_params=model.num_inference_params(), class_counts=class_counts)
    return config


def _ncl_section(model: NCLModel, *, fmt: str, variant: str, expert_index: Optional[int],
                 selected_expert: Optional[int], source_num_experts: int, num_params: int,
                 class_counts: Optional[Sequence[int]]) -> Dict[str, Any]:
    """config.json's ``ncl`` section: what was exported, from which ensemble (read by the card and by loaders)."""
    from . import __version__

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


def _resolve_expert_index(expert_index: Optional[int], metrics: Optional[dict], run_info: Optional[dict]) -> int:
    for candidate in (expert_index, _get(metrics, "selected_expert"), _get(run_info, "selected_expert")):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        "variant 'expert' needs expert_index, or metrics['selected_expert'] (the expert chosen on the validation split)"
    )


def _source_num_experts(model: NCLModel, metrics: Optional[dict]) -> int:
    if model.num_experts > 1:
        return model.num_experts
    for split in (_get(metrics, "splits") or {}).values():
        if isinstance(split, dict) and split.get("experts"):
            return len(split["experts"])
    return 1


# ---------------------------------------------------------------------------------------------- model card
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _duration(seconds: Any) -> Optional[str]:
    if not isinstance(seconds, (int, float)):
        return None
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _dataset_id(dataset: Optional[str]) -> Optional[str]:
    """The Hub dataset id, when ``dataset`` looks like one (``namespace/name``, not a local path)."""
    if not isinstance(dataset, str) or not _HUB_ID.match(dataset) or os.path.exists(dataset):
        return None
    return dataset


def _base_model(backbone: str, training_config: Optional[dict]) -> Optional[str]:
    pretrained = _get(training_config, "model.pretrained_backbone", _get(training_config, "model.pretrained"))
    if not pretrained:
        return None
    if isinstance(pretrained, str) and _HUB_ID.match(pretrained):
        return pretrained
    cfg = timm.models.get_pretrained_cfg(backbone)
    hub_id = getattr(cfg, "hf_hub_id", None)
    return hub_id if hub_id and "/" in hub_id and not hub_id.endswith("/") else None


def _results(metrics: Optional[dict], variant: str, expert_index: Optional[int], selected: Optional[int],
             selection_known: bool = True) -> List[Dict[str, Any]]:
    """Per evaluated split: a title and table rows (every expert, then the ensemble)."""
    splits = _get(metrics, "splits") or {}
    order = [s for s in ("test", "val") if s in splits] + [s for s in splits if s not in ("test", "val")]
    out = []
    for name in order:
        split = splits[name]
        if not isinstance(split, dict):
            continue
        rows = []
        for k, expert in enumerate(split.get("experts") or []):
            notes = (["selected"] if k == selected else []) + (["this model"] if variant == "expert" and
                                                               k == expert_index else [])
            label = f"Expert {k}" + (f" ({', '.join(notes)})" if notes else "")
            rows.append(_row(label, expert))
        if split.get("ensemble"):
            label = f"Ensemble of {len(split.get('experts') or []) or 'K'}"
            rows.append(_row(label + (" (this model)" if variant == "ensemble" else ""), split["ensemble"]))
        if not rows:
            continue
        titles = {"test": "Test split", "val": "Validation split"}
        title = titles.get(name, f"Split '{name}'")
        if split.get("num_samples") is not None:
            title += f" ({split['num_samples']} images)"
        note = ""
        if selection_known:
            note = {"val": "The selection split (checkpoint and single expert).",
                    "test": "Held out: not used for any selection."}.get(name, "")
        out.append({"name": name, "title": title, "note": note, "rows": rows})
    return out


def _row(label: str, m: dict) -> Dict[str, str]:
    return {"label": label, "top1": _fmt(m.get("top1")), "many": _fmt(m.get("many")), "medium": _fmt(m.get("medium")),
            "few": _fmt(m.get("few")), "ece": _fmt(m.get("ece"), 3), "nll": _fmt(m.get("nll"), 3)}


def _eval_results(metrics: Optional[dict], variant: str, expert_index: Optional[int], dataset: Optional[str],
                  dataset_title: str) -> list:
    from huggingface_hub import EvalResult

    out = []
    for name, split in (_get(metrics, "splits") or {}).items():
        if not isinstance(split, dict):
            continue
        if variant == "ensemble":
            numbers = split.get("ensemble")
        else:
            experts = split.get("experts") or []
            numbers = experts[expert_index] if expert_index is not None and expert_index < len(experts) else None
        if not numbers:
            continue
        for key, metric_name in (("top1", "Top-1 accuracy"), ("many", "Top-1 accuracy (many)"),
                                 ("medium", "Top-1 accuracy (medium)"), ("few", "Top-1 accuracy (few)")):
            value = numbers.get(key)
            if value is None:
                continue  # an empty class group
            out.append(EvalResult(
                task_type="image-classification", task_name="Long-tailed image classification",
                dataset_type=dataset or "custom", dataset_name=dataset_title, dataset_split=name,
                metric_type="accuracy", metric_name=metric_name, metric_value=round(float(value), 4),
            ))
    return out


def _named_classes(label_names: Optional[Sequence[str]]) -> List[str]:
    """The class names worth listing in the card: none when they are only the indices "0".."C-1"."""
    names = [str(n) for n in label_names or []]
    return [] if names == [str(i) for i in range(len(names))] else names


def _class_summary(class_counts: Optional[Sequence[int]]) -> Optional[Dict[str, Any]]:
    if not class_counts:
        return None
    counts = [int(c) for c in class_counts]
    hi, lo = max(counts), min(counts)
    return {"num_classes": len(counts), "max": hi, "min": lo, "total": sum(counts),
            "ratio": f"{hi / lo:.1f}" if lo > 0 else "inf (a class has no training image)"}


def render_model_card(
    hub_config: Dict[str, Any],
    *,
    metrics: Optional[dict] = None,
    training_config: Optional[dict] = None,
    run_info: Optional[dict] = None,
    command: Optional[str] = None,
    repo_id: Optional[str] = None,
    plots: Sequence[str] = (),
    folder_name: str = "export",
    secrets: Sequence[str] = (),
) -> str:
    """README.md text for an export, from its config.json content (``hub_config``) and the run's records.

    Args:
        hub_config: the export's config.json (with its ``ncl`` section).
        metrics: eval/metrics.json content, or None (the card then says no results were recorded).
        training_config: the resolved training config (``model.backbone``, ``data.dataset``, ``train.epochs``, ...).
        run_info: run_info.json content (dataset, epochs, best epoch, command, ...).
        command: the training command line (overrides ``run_info['command']``).
        repo_id: Hub repo the card is for (usage code); None gives a ``local-dir:`` example.
        plots: file names of the PNGs stored next to the card.
        folder_name: used for the title and the ``local-dir:`` example when ``repo_id`` is None.
        secrets: strings (tokens) replaced by ``REDACTED`` wherever they would appear.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .priors import describe_prior

    template = _card_template()
    ncl = hub_config.get("ncl") or {}
    fmt = ncl.get("format", "ncl")
    variant = ncl.get("variant", "ensemble")
    expert_index = ncl.get("expert_index") if variant == "expert" else None
    selected = ncl.get("selected_expert")
    if selected is None:
        selected = _get(metrics, "selected_expert", _get(run_info, "selected_expert"))
    if expert_index is None and variant == "expert":
        expert_index = selected
    backbone = ncl.get("backbone") or _get(hub_config, "model_args.backbone") or hub_config.get("architecture")
    num_classes = hub_config.get("num_classes")
    class_counts = ncl.get("class_counts") or _get(metrics, "class_counts") or _get(run_info, "class_counts")
    dataset = _get(training_config, "data.dataset") or _get(run_info, "dataset")
    imbalance = _get(training_config, "data.imbalance_factor", _get(run_info, "imbalance_factor"))
    # the config layout varies (train.epochs / epochs, train.loss / loss.name): take the first one present
    epochs = _first(_get(training_config, "train.epochs"), _get(training_config, "epochs"), _get(run_info, "epochs"))
    loss = _first(_get(training_config, "train.loss"), _get(training_config, "loss.name"),
                  _get(training_config, "loss") if isinstance(_get(training_config, "loss"), str) else None)
    command = command or _get(run_info, "command")
    dataset_hub_id = _dataset_id(dataset)
    if isinstance(imbalance, (int, float)):
        imbalance = f"{imbalance:g}"
    dataset_title = str(dataset or "custom dataset") + (f" (imbalance factor {imbalance})" if imbalance else "")
    name = repo_id.split("/")[-1] if repo_id else folder_name
    short_schedule = None
    if isinstance(epochs, (int, float)) and isinstance(dataset, str):
        for family, paper_epochs in _PAPER_EPOCHS:
            if family in dataset.lower() and epochs < paper_epochs:
                short_schedule = {"epochs": epochs, "paper_epochs": paper_epochs}
                break
    selection = _selection_text(metrics, expert_index if variant == "expert" else selected, selected,
                                ncl.get("source_num_experts"))
    best_epoch = _get(run_info, "best_epoch")
    selection_note = _selection_note(metrics, selected, best_epoch)
    pretrained_cfg = hub_config.get("pretrained_cfg") or {}
    card_data = ModelCardData(
        library_name="timm",
        license="apache-2.0",
        tags=list(CARD_TAGS),
        datasets=[dataset_hub_id] if dataset_hub_id else None,
        base_model=_base_model(backbone, training_config) if backbone else None,
        pipeline_tag="image-classification",
        model_name=name,
        eval_results=_eval_results(metrics, variant, expert_index, dataset_hub_id or dataset, dataset_title) or None,
    )
    context = dict(
        model_title=name,
        fmt=fmt,
        variant=variant,
        backbone=backbone,
        num_experts=ncl.get("num_experts", _get(hub_config, "model_args.num_experts", 1)),
        source_num_experts=ncl.get("source_num_experts") or 1,
        expert_index=expert_index,
        classifier=ncl.get("classifier", "linear"),
        cosine_scale=ncl.get("cosine_scale"),
        num_classes=num_classes,
        label_names=_named_classes(hub_config.get("label_names")),
        num_params=ncl.get("num_params"),
        input_size="x".join(str(s) for s in pretrained_cfg.get("input_size", ())),
        mean=pretrained_cfg.get("mean"),
        std=pretrained_cfg.get("std"),
        selection=selection,
        selection_note=selection_note,
        dataset=dataset,
        dataset_hub_id=dataset_hub_id,
        imbalance_factor=imbalance,
        classes=_class_summary(class_counts),
        epochs=epochs,
        best_epoch=best_epoch,
        wall_time=_duration(_get(run_info, "wall_time_s")),
        loss=loss,
        command=command,
        has_training_config=training_config is not None,
        results=_results(metrics, variant, expert_index, selected, selection_known=selection_note is not None),
        groups=_get(metrics, "groups"),
        prior_shift=_prior_shift_table(metrics, expert_index if variant == "expert" else selected,
                                       "this model" if variant == "expert" else "selected"),
        class_prior=describe_prior(ncl.get("class_prior"), ncl.get("prior_strength")),
        prior_results_balanced=bool(metrics) and _get(metrics, "class_prior") is None,
        plots=list(plots),
        model_ref=f"hf-hub:{repo_id}" if repo_id else f"local-dir:/path/to/{folder_name}",
        short_schedule=short_schedule,
        pretrained_backbone=card_data.base_model,
        bibtex=BIBTEX,
    )
    card = ModelCard.from_template(card_data, template_str=template, **context)
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"
    return _redact(text, secrets)


def _prior_shift_table(metrics: Optional[dict], expert: Optional[int], expert_note: str) -> Optional[Dict[str, str]]:
    """The shifted-test-prior table of the test split (else the first split that has one), for the card."""
    from .evaluate import format_prior_shift

    splits = _get(metrics, "splits") or {}
    for name in ["test"] + [s for s in splits if s != "test"]:
        split = splits.get(name)
        if isinstance(split, dict) and split.get("prior_shift") and split.get("per_class_accuracy"):
            table = format_prior_shift(split, expert, metrics.get("prior_strength", 1.0),
                                       deployed=metrics.get("class_prior") is not None, expert_note=expert_note)
            return {"split": name, "table": table.rstrip("\n")}
    return None


def _selection_text(metrics: Optional[dict], index: Optional[int], selected: Optional[int],
                    source_k: Optional[int]) -> Optional[str]:
    """How expert ``index`` relates to the validation-split selection (``selected``), for the card."""
    if index is None:
        return None
    k = source_k or "?"
    if selected is None:
        return f"expert {index} of {k}, chosen at export (no validation-split selection was recorded)"
    if index != selected:
        return f"expert {index} of {k}; the validation split selected expert {selected}"
    tops = [e.get("top1") for e in _get(metrics, "splits.val.experts") or []]
    if tops and all(t is not None for t in tops) and max(range(len(tops)), key=lambda i: tops[i]) == index:
        return (f"expert {index} of {k}, the one with the best top-1 accuracy on the validation split "
                f"({tops[index]:.2f}%)")
    return f"expert {index} of {k}, selected on the validation split"


def _selection_note(metrics: Optional[dict], selected: Optional[int], best_epoch: Optional[int]) -> Optional[str]:
    """The limitation about selection: what was chosen on the validation split, and what the test split is."""
    chosen = []
    if best_epoch is not None:
        chosen.append(f"the checkpoint (epoch {best_epoch})")
    if selected is not None:
        chosen.append("the single expert")
    if not chosen:
        return None
    note = " and ".join(chosen) + (" were" if len(chosen) > 1 else " was") + " chosen on the validation split"
    if "test" in (_get(metrics, "splits") or {}):
        note += ("; the test numbers were not used for any selection, so they are not selection numbers (the "
                 "paper's released code picked both on the test set)")
    return note[0].upper() + note[1:] + "."


# ---------------------------------------------------------------------------------------------- export
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
    class_counts = _first(class_counts, model.class_counts, _get(metrics, "class_counts"))
    _check_class_info(model.num_classes, class_names, class_counts)
    if model.class_counts is not None and [int(c) for c in class_counts] != [int(c) for c in model.class_counts]:
        raise ValueError("class_counts differ from the model's own (model.class_counts), which its class prior "
                         "may use; pass the model's counts or none")
    source_k = _source_num_experts(model, metrics)
    if variant == "expert":
        expert_index = _resolve_expert_index(expert_index, metrics, run_info)
        if model.num_experts > 1:
            saved = model.expert(expert_index)
        elif expert_index >= source_k:
            raise ValueError(f"expert_index {expert_index} out of range for K={source_k}")
        else:
            saved = model
    else:
        saved = model
    selected = _get(metrics, "selected_expert", _get(run_info, "selected_expert"))
    hub_config = _hub_config(saved, variant=variant, expert_index=expert_index if variant == "expert" else None,
                             selected_expert=selected, source_num_experts=source_k, class_names=class_names,
                             class_counts=class_counts)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in saved.inference_state_dict().items()}
    folder = Path(folder)
    with _atomic_folder(folder) as tmp:
        import safetensors.torch

        safetensors.torch.save_file(state_dict, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(hub_config, indent=2) + "\n", encoding="utf-8")
        plots = _write_extras(tmp, config=config, plots_dir=plots_dir)
        card = render_model_card(hub_config, metrics=metrics, training_config=config, run_info=run_info,
                                 command=command, repo_id=repo_id, plots=plots, folder_name=folder.name)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return folder


def _expert_input(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    param = next(model.parameters())
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    return x.to(device=param.device, dtype=param.dtype)


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
    from timm.models._hub import save_for_hf

    if model.class_prior is not None:
        raise ValueError(
            "cannot export a plain timm model with a class prior: timm alone would not add it to the logits. Use "
            "the NCL format (ncl_hub.hub.save_pretrained), which keeps it, or model.set_class_prior(None) first."
        )
    backbone = model.backbone
    if not _is_native_timm(backbone):
        module = model_entrypoint(backbone).__module__ if timm.is_model(backbone) else "nowhere"
        raise ValueError(
            f"cannot export a plain timm model: the trunk {backbone!r} is registered by {module}, not by timm, so "
            f"timm alone could not rebuild it. Use the NCL format (ncl_hub.hub.save_pretrained / --format ncl), "
            f"which loads with `import ncl_hub`."
        )
    if not 0 <= expert_index < model.num_experts:
        raise ValueError(f"expert_index {expert_index} out of range for K={model.num_experts}")
    head = model.heads[expert_index]
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"cannot export a plain timm model: expert {expert_index} has a {type(head).__name__} head "
            f"({model.classifier} classifier), and timm classifiers are linear layers. Use the NCL format "
            f"(ncl_hub.hub.save_pretrained / --format ncl)."
        )
    class_counts = class_counts if class_counts is not None else _get(metrics, "class_counts")
    _check_class_info(model.num_classes, class_names, class_counts)
    plain = timm.create_model(backbone, num_classes=model.num_classes, in_chans=model.in_chans,
                              **model.backbone_kwargs)
    trunk_state = model.trunks[expert_index].state_dict()
    result = plain.load_state_dict(trunk_state, strict=False)
    classifier = plain.get_classifier()
    classifier_params = {id(p) for p in classifier.parameters()}
    head_keys = {n for n, p in plain.named_parameters() if id(p) in classifier_params}
    if result.unexpected_keys or set(result.missing_keys) - head_keys:
        raise ValueError(f"the trunk's weights do not fit a plain {backbone!r}: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    if not isinstance(classifier, nn.Linear) or classifier.weight.shape != head.weight.shape:
        raise ValueError(f"{backbone!r}'s classifier ({type(classifier).__name__}) cannot hold the expert's "
                         f"linear head {tuple(head.weight.shape)}")
    classifier.load_state_dict(head.state_dict())
    plain = plain.to(next(model.parameters()).device)

    src_cfg = _ncl_pretrained_cfg(model)
    was_training = model.training
    model.train(False)
    plain.train(False)
    try:
        with torch.no_grad():
            x = _expert_input(plain, src_cfg["input_size"])
            want = head(model.trunks[expert_index](x))
            got = plain(x)
    finally:
        model.train(was_training)
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"plain timm {backbone!r} does not reproduce expert {expert_index}: max abs diff "
                           f"{(got - want).abs().max().item():.3g}")
    plain = plain.cpu()
    # timm's own cfg names the pretrained tag of timm's weights, which these are not
    plain.pretrained_cfg = plain.default_cfg = dict(plain.pretrained_cfg, tag=None)

    data_config = {k: src_cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                   if k in src_cfg}
    selected = _get(metrics, "selected_expert", _get(run_info, "selected_expert"))
    model_config: Dict[str, Any] = {
        "ncl": _ncl_section(model, fmt="timm", variant="expert", expert_index=expert_index, selected_expert=selected,
                            source_num_experts=model.num_experts, num_params=sum(p.numel() for p in plain.parameters()),
                            class_counts=class_counts),
    }
    if class_names is not None:
        model_config["label_names"] = list(class_names)
    folder = Path(folder)
    with _atomic_folder(folder) as tmp:
        save_for_hf(plain, str(tmp), model_config=model_config, safe_serialization=True, data_config=data_config)
        hub_config = _read_json(tmp / CONFIG_NAME)
        plots = _write_extras(tmp, config=config, plots_dir=plots_dir)
        card = render_model_card(hub_config, metrics=metrics, training_config=config, run_info=run_info,
                                 command=command, repo_id=repo_id, plots=plots, folder_name=folder.name)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------- loading
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
    trunk weights from the checkpoint, and the head too when it is linear and C is unchanged.

    Raises:
        WeightsUnavailableError: the Hub repo (or its weights) cannot be fetched.
        CheckpointMismatchError: the folder is not an NCL or timm export.
    """
    source, location = _parse_spec(spec)
    cache_dir = kwargs.get("cache_dir")
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
    hub_cfg, where = _read_hub_config(source, location, cache_dir)
    arch = hub_cfg.get("architecture")
    if _is_ncl_architecture(arch):
        saved_counts = _get(hub_cfg, "ncl.class_counts")
        if saved_counts and "class_counts" not in (hub_cfg.get("model_args") or {}) and num_classes in (
                None, hub_cfg.get("num_classes")):  # an export from before model_args held the counts
            kwargs.setdefault("class_counts", saved_counts)
        model = timm.create_model(f"{source}:{location}", pretrained=True, num_classes=num_classes, **kwargs)
        return _after_load(model, experts)
    if arch and timm.is_model(arch):
        return _load_plain_timm(hub_cfg, source, location, where, num_classes, experts, kwargs)
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


def _plain_classifier_names(hub_cfg: dict) -> Tuple[str, ...]:
    names = _get(hub_cfg, "pretrained_cfg.classifier")
    if names is None:
        arch_cfg = timm.models.get_pretrained_cfg(hub_cfg["architecture"])
        names = getattr(arch_cfg, "classifier", None)
    if isinstance(names, str):
        names = (names,)
    return tuple(names or ())


def _split_plain_state(state_dict: Dict[str, torch.Tensor], classifier_names: Sequence[str]):
    """A plain timm state dict -> (trunk tensors, head tensors) of its single expert."""
    head, trunk = {}, {}
    for key, value in state_dict.items():
        name = next((c for c in classifier_names if key.startswith(c + ".")), None)
        if name is not None:
            head[key[len(name) + 1:]] = value
        else:
            trunk[key] = value
    return trunk, head


def _load_plain_timm(hub_cfg: dict, source: str, location: str, where: str, num_classes: Optional[int],
                     experts: Optional[Sequence[int]], kwargs: Dict[str, Any]) -> NCLModel:
    arch = hub_cfg["architecture"]
    if experts is not None and list(experts) != [0]:
        raise ValueError(f"{where} is a single plain timm model (one expert); experts={list(experts)} is invalid")
    saved_classes = int(hub_cfg.get("num_classes", _get(hub_cfg, "pretrained_cfg.num_classes", 0)) or 0)
    args = dict(hub_cfg.get("model_args") or {})
    args.pop("num_classes", None)
    in_chans = args.pop("in_chans", 3)
    kwargs = dict(kwargs)
    cache_dir = kwargs.pop("cache_dir", None)
    pretrained_cfg = hub_cfg.get("pretrained_cfg") or {}
    overlay = {k: pretrained_cfg[k] for k in _factory._INPUT_KEYS if k in pretrained_cfg}
    overlay.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
    target_classes = saved_classes if num_classes is None else num_classes
    model = timm.create_model("ncl", backbone=arch, num_classes=target_classes, num_experts=1, classifier="linear",
                              in_chans=in_chans, pretrained_cfg_overlay=overlay, **{**args, **kwargs})
    state_dict = _read_state_dict(source, location, cache_dir)
    trunk, head = _split_plain_state(state_dict, _plain_classifier_names(hub_cfg))
    try:
        model.trunks[0].load_state_dict(trunk, strict=True)
    except RuntimeError as e:
        raise CheckpointMismatchError(f"{where}: its {arch!r} weights do not fit the trunk ({e})") from e
    if head and target_classes == saved_classes and isinstance(model.heads[0], nn.Linear):
        model.heads[0].load_state_dict(head)
    if target_classes == saved_classes and hub_cfg.get("label_names"):
        model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, label_names=hub_cfg["label_names"])
    model.reset_momentum_encoders()
    return model


def _checkpoint_as_ncl(hub_cfg: dict, state_dict: Dict[str, torch.Tensor], where: str):
    """(backbone, K, classifier, NCL-keyed state dict) of an NCL or plain-timm export."""
    arch = hub_cfg.get("architecture")
    if _is_ncl_architecture(arch):
        args = hub_cfg.get("model_args") or {}
        backbone = args.get("backbone")
        if backbone is None:
            raise CheckpointMismatchError(f"{where}: config.json model_args has no 'backbone'")
        experts = {k.split(".")[1] for k in state_dict if k.startswith("trunks.")}
        return backbone, len(experts), args.get("classifier", "linear"), state_dict
    if arch and timm.is_model(arch):
        trunk, head = _split_plain_state(state_dict, _plain_classifier_names(hub_cfg))
        converted = {f"trunks.0.{k}": v for k, v in trunk.items()}
        converted.update({f"heads.0.{k}": v for k, v in head.items()})
        return arch, 1, "linear", converted
    raise CheckpointMismatchError(
        f"{where} is not an NCL or timm export: config.json architecture {arch!r} is not a registered timm model."
    )


def _resolve_weights_spec(spec: Union[str, os.PathLike]) -> Tuple[str, str]:
    source, location = _parse_spec(spec)
    if source != "name":
        return source, location
    cfg = timm.models.get_pretrained_cfg(location)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise WeightsUnavailableError(
            f"{location!r} has no published weights to initialise from; pass a local export instead "
            f"('local-dir:/path/to/export' or the folder path)."
        )
    return "hf-hub", hub_id


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
    source, location = _resolve_weights_spec(spec)
    hub_cfg, where = _read_hub_config(source, location)
    state_dict = _read_state_dict(source, location)
    backbone, ck_k, ck_classifier, state_dict = _checkpoint_as_ncl(hub_cfg, state_dict, where)
    if backbone != model.backbone:
        raise CheckpointMismatchError(
            f"{where} was trained with backbone {backbone!r}, but this model's backbone is {model.backbone!r}. "
            f"Build the model with backbone={backbone!r} (the export's config.json model_args) to initialise from it."
        )
    experts = list(range(model.num_experts)) if experts is None else [int(i) for i in experts]
    if len(experts) != model.num_experts:
        raise ValueError(f"experts={experts} must name one checkpoint expert per model expert (K={model.num_experts})")
    if any(not 0 <= i < ck_k for i in experts):
        raise CheckpointMismatchError(
            f"{where} has {ck_k} expert(s); cannot take experts {experts} for a model with K={model.num_experts}. "
            f"Pass experts= with indices below {ck_k} (repeating one is allowed) or build the model with fewer experts."
        )
    trunks, heads = {}, {}
    for slot, src in enumerate(experts):
        for part, out in (("trunks", trunks), ("heads", heads)):
            prefix = f"{part}.{src}."
            for key, value in state_dict.items():
                if key.startswith(prefix):
                    out[f"{part}.{slot}.{key[len(prefix):]}"] = value
    weights = files.find_weights(location) if source == "local-dir" else None
    check_trunks_match(trunks, model, source=str(weights) if weights else f"'{WEIGHTS_NAME}' of {where}")
    model.trunks.load_state_dict({k[len("trunks."):]: v for k, v in trunks.items()}, strict=True)
    if load_heads:
        own = {k: v for k, v in model.state_dict().items() if k.startswith("heads.")}
        fits = (ck_classifier == model.classifier and set(own) == set(heads)
                and all(own[k].shape == heads[k].shape for k in own))
        if fits:
            model.heads.load_state_dict({k[len("heads."):]: v for k, v in heads.items()}, strict=True)
        else:
            warnings.warn(
                f"heads not loaded from {where}: its {ck_classifier} heads "
                f"{sorted({tuple(v.shape) for v in heads.values()})} do not match this model's {model.classifier} "
                f"heads {sorted({tuple(v.shape) for v in own.values()})}; they stay freshly initialised.",
                stacklevel=2,
            )
    model.reset_momentum_encoders()
    return model


def freeze_trunks(model: NCLModel) -> NCLModel:
    """Stop gradients into every trunk (a linear probe of the heads); returns ``model``.

    Only ``requires_grad`` changes. BatchNorm running statistics of the trunks still update in ``model.train()``;
    put the trunks in eval mode after each ``model.train()`` call (``for t in model.trunks: t.train(False)``) to keep
    them fixed too. The MoCo key encoders already hold no gradient; their query projections are left trainable.
    """
    for p in model.trunks.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------- publish
def _resolve_token(token: Optional[str]) -> Optional[str]:
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()  # HF_TOKEN, then the token saved by `hf auth login`


def _is_export(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def _stage_copy(src: Path, dst: Path, *, repo_id: str, metrics, training_config, run_info, secrets) -> Path:
    """Copy an existing export, re-rendering its card for ``repo_id``, and redact secrets from text files."""
    hub_config = _read_json(src / CONFIG_NAME)
    with _atomic_folder(dst) as tmp:
        for item in src.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        plots = sorted(p.name for p in tmp.glob("*.png"))
        card = render_model_card(hub_config, metrics=metrics, training_config=training_config, run_info=run_info,
                                 repo_id=repo_id, plots=plots, folder_name=dst.name, secrets=secrets)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _redact_folder(tmp, secrets)
    return dst


def _redact_folder(folder: Path, secrets: Sequence[str]) -> None:
    """Replace secrets in the text files of ``folder`` (a token pasted into a command line or a config)."""
    secrets = [s for s in secrets if s and len(s) >= 8]
    for item in folder.iterdir():
        if secrets and item.is_file() and item.suffix in (".md", ".json", ".yaml", ".yml", ".txt"):
            text = item.read_text(encoding="utf-8")
            if any(s in text for s in secrets):
                item.write_text(_redact(text, secrets), encoding="utf-8")


def publish(
    output_dir: Union[str, Path],
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: Optional[str] = None,
    format: str = "ncl",
    commit_message: Optional[str] = None,
) -> Dict[str, Any]:
    """Publish a training run as two Hub repos: the ensemble (``repo_id``) and the selected expert
    (``f"{repo_id}-expert"``).

    Both folders are staged under ``OUTPUT_DIR/publish/{ensemble,expert}``: copies of ``OUTPUT_DIR/export/`` when
    present (cards re-rendered for the repo ids), else built from ``best/`` + ``eval/metrics.json`` +
    ``run_info.json``. With ``format="timm"`` the expert is a plain timm model (see :func:`export_timm`); the
    ensemble stays in the NCL format, since one timm model cannot hold K experts.

    Args:
        output_dir: the trainer's output folder.
        repo_id: ``ORG/NAME`` of the ensemble repo.
        private: create private repos.
        dry_run: only stage the folders; no network call.
        token: Hub token; default ``HF_TOKEN`` or the saved ``hf auth login`` token. Never written anywhere.
        format: ``"ncl"`` or ``"timm"`` (the expert's format).
        commit_message: commit message of both uploads.

    Returns:
        ``{"dry_run", "format", "ensemble": {"repo_id", "folder", "url", "commit"}, "expert": {...}}``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    if not _HUB_ID.match(repo_id):
        raise ValueError(f"repo_id must look like 'ORG/NAME', got {repo_id!r}")
    output_dir = Path(output_dir)
    run_info = _read_json(output_dir / "run_info.json") or {}
    metrics = _read_json(output_dir / "eval" / "metrics.json")
    training_config = _read_yaml(output_dir / "config.yaml")
    resolved_token = None if dry_run else _resolve_token(token)
    if not dry_run and not resolved_token:
        raise ValueError("no Hugging Face token: pass token=..., set HF_TOKEN, or run `hf auth login`")
    # redact every token this process could hold, also in dry runs (a token pasted into the training command)
    secrets = [s for s in (token, resolved_token, os.environ.get("HF_TOKEN"),
                           os.environ.get("HUGGING_FACE_HUB_TOKEN")) if s]
    stage = output_dir / "publish"
    repos = {"ensemble": repo_id, "expert": f"{repo_id}-expert"}
    export = output_dir / "export"
    class_names = run_info.get("class_names")
    class_counts = run_info.get("class_counts") or _get(metrics, "class_counts")
    command = _redact(run_info["command"], secrets) if run_info.get("command") else None
    common = dict(metrics=metrics, config=training_config, class_names=class_names, class_counts=class_counts,
                  plots_dir=output_dir / "eval", command=command, run_info=run_info)
    card_args = dict(metrics=metrics, training_config=training_config, run_info=run_info, secrets=secrets)

    model = None

    def trained_model() -> NCLModel:
        nonlocal model
        if model is None:
            source = export / "ensemble" if _is_export(export / "ensemble") else output_dir / "best"
            if not _is_export(source):
                raise FileNotFoundError(f"no model in {output_dir}: expected export/ensemble/ or best/ with "
                                        f"{CONFIG_NAME} and {WEIGHTS_NAME}")
            model = load_model(source).train(False)
        return model

    folders: Dict[str, Path] = {}
    # the expert first: a trunk or head that --format timm refuses fails before anything is staged
    if format == "timm":
        selected = _resolve_expert_index(None, metrics, run_info)
        folders["expert"] = export_timm(trained_model(), stage / "expert", expert_index=selected,
                                        repo_id=repos["expert"], **common)
    elif _is_export(export / "expert"):
        folders["expert"] = _stage_copy(export / "expert", stage / "expert", repo_id=repos["expert"], **card_args)
    else:
        folders["expert"] = save_pretrained(trained_model(), stage / "expert", variant="expert",
                                            repo_id=repos["expert"], **common)
    if _is_export(export / "ensemble"):
        folders["ensemble"] = _stage_copy(export / "ensemble", stage / "ensemble", repo_id=repos["ensemble"],
                                          **card_args)
    else:
        folders["ensemble"] = save_pretrained(trained_model(), stage / "ensemble", variant="ensemble",
                                              repo_id=repos["ensemble"], **common)

    for folder in folders.values():  # the built folders hold the training config and the command too
        _redact_folder(folder, secrets)
    result: Dict[str, Any] = {"dry_run": dry_run, "format": format}
    for name in ("ensemble", "expert"):
        folder = folders[name]
        result[name] = {"repo_id": repos[name], "folder": str(folder), "url": None, "commit": None}
    if dry_run:
        return result

    from huggingface_hub import HfApi

    api = HfApi(token=resolved_token, library_name="ncl_hub")
    for name in ("ensemble", "expert"):
        folder = folders[name]
        url = api.create_repo(repos[name], exist_ok=True, private=private, repo_type="model")
        message = commit_message or f"Upload NCL {name} ({format} format) with ncl_hub"
        info = api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), commit_message=message,
                                 repo_type="model")
        result[name].update(repo_id=url.repo_id, url=str(url), commit=getattr(info, "oid", None))
        _logger.info("published %s to %s", name, url)
    return result
