"""Model cards: the README.md of an export, rendered from the package's ``templates/ncl_model_card.md`` (package
data, read with ``importlib.resources``, so a wheel install finds it) with huggingface_hub's ``ModelCard``.

The card is made from the export's config.json, the run's metrics (``evaluate_predictions`` output) and a
:class:`RunRecord`: what the run was, read once from run_info.json and the training config.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import timm

from ..config import loss_departures
from ..evaluate import format_prior_shift
from ..priors import describe_prior
from .layout import HUB_ID, redact

__all__ = ["CARD_TAGS", "RunRecord", "render_model_card"]

# package data (ncl_hub/templates/); model_cards/ncl_model_card.md in the repository is a link to this file
CARD_TEMPLATE = "templates/ncl_model_card.md"
CARD_TAGS = ["image-classification", "timm", "long-tailed", "ncl", "multi-expert"]
# paper schedule per dataset family (REFERENCE.md), to flag short-schedule numbers in the card
_PAPER_EPOCHS = (("cifar", 400), ("imagenet", 400), ("inat", 400), ("places", 30))

BIBTEX = """@inproceedings{li2022nested,
  title     = {Nested Collaborative Learning for Long-Tailed Visual Recognition},
  author    = {Li, Jun and Tan, Zichang and Wan, Jun and Lei, Zhen and Guo, Guodong},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022},
  eprint    = {2203.15359},
  archivePrefix = {arXiv}
}"""


def _card_template() -> str:
    """The text of the model card template shipped inside the package."""
    from importlib.resources import files as package_files

    return package_files("ncl_hub").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")


@dataclass
class RunRecord:
    """What a model card says about the training run. :meth:`read` is the one place that knows where each fact
    lives in run_info.json, the resolved training config (``RunConfig`` layout, or the older ``train.*`` one) and
    metrics.json."""

    dataset: Optional[str] = None
    imbalance_factor: Optional[float] = None
    epochs: Optional[int] = None
    loss: Optional[str] = None
    loss_details: Optional[str] = None  # NCL's equations, beta, lambda and any option that departs from the paper
    best_epoch: Optional[int] = None
    selected_expert: Optional[int] = None
    command: Optional[str] = None
    wall_time_s: Optional[float] = None
    class_counts: Optional[List[int]] = None
    pretrained_backbone: Any = None  # true, or the Hub id of the weights the trunks started from
    unreadable: Optional[Dict[str, int]] = None  # images left out as unreadable (data.skip_unreadable), per split

    @classmethod
    def read(cls, run_info: Optional[dict], training_config: Optional[dict], metrics: Optional[dict]) -> "RunRecord":
        info, config, metrics = run_info or {}, training_config or {}, metrics or {}
        model, data, train = (config.get(k) if isinstance(config.get(k), dict) else {}
                              for k in ("model", "data", "train"))
        loss = config.get("loss")
        return cls(
            dataset=data.get("dataset") or info.get("dataset"),
            imbalance_factor=data.get("imbalance_factor", info.get("imbalance_factor")),
            epochs=_first(train.get("epochs"), config.get("epochs"), info.get("epochs")),
            loss=_first(train.get("loss"), loss.get("name") if isinstance(loss, dict) else loss),
            loss_details=_describe_loss(loss) if isinstance(loss, dict) else None,
            best_epoch=info.get("best_epoch"),
            selected_expert=metrics.get("selected_expert", info.get("selected_expert")),
            command=info.get("command"),
            wall_time_s=info.get("wall_time_s"),
            class_counts=metrics.get("class_counts") or info.get("class_counts"),
            pretrained_backbone=model.get("pretrained_backbone", model.get("pretrained")),
            unreadable={split: len(rows) for split, rows in (info.get("unreadable_images") or {}).items()
                        if rows} or None,
        )


def _describe_loss(loss: dict) -> Optional[str]:
    """For NCL: its equations, beta and lambda, and every option that departs from the paper's objective."""
    if loss.get("name") != "ncl":
        return None
    parts = [f"variant {loss.get('variant', 'paper')}"]
    parts += [f"{label} {loss[key]:g}" for key, label in (("hard_ratio", "beta"), ("distill_weight", "lambda"))
              if isinstance(loss.get(key), (int, float))]
    departures = loss_departures(loss)
    return ", ".join(parts) + ("; not in the paper: " + "; ".join(departures) if departures else "")


def _unreadable_text(unreadable: Optional[Dict[str, int]]) -> Optional[str]:
    """How many images of each split were left out as unreadable (``data.skip_unreadable``), or None."""
    if not unreadable:
        return None
    parts = [f"{n} unreadable {'training' if split == 'train' else split} image(s)" for split, n in unreadable.items()]
    return (", ".join(parts) + " were left out (truncated, empty or not an image; `data.skip_unreadable`); "
            "run_info.json lists them")


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


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
    if not isinstance(dataset, str) or not HUB_ID.match(dataset) or os.path.exists(dataset):
        return None
    return dataset


def _base_model(backbone: str, pretrained: Any) -> Optional[str]:
    """The Hub id of the weights the trunks started from, when ``pretrained`` (a flag or a Hub id) says they did."""
    if not pretrained:
        return None
    if isinstance(pretrained, str) and HUB_ID.match(pretrained):
        return pretrained
    cfg = timm.models.get_pretrained_cfg(backbone)
    hub_id = getattr(cfg, "hf_hub_id", None)
    return hub_id if hub_id and "/" in hub_id and not hub_id.endswith("/") else None


def _results(metrics: Optional[dict], variant: str, expert_index: Optional[int], selected: Optional[int],
             selection_known: bool = True) -> List[Dict[str, Any]]:
    """Per evaluated split: a title and table rows (every expert, then the ensemble)."""
    splits = (metrics or {}).get("splits") or {}
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
    for name, split in ((metrics or {}).get("splits") or {}).items():
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
        training_config: the resolved training config (``model.backbone``, ``data.dataset``, ``epochs``, ...).
        run_info: run_info.json content (dataset, epochs, best epoch, command, ...).
        command: the training command line (overrides ``run_info['command']``).
        repo_id: Hub repo the card is for (usage code); None gives a ``local-dir:`` example.
        plots: file names of the PNGs stored next to the card.
        folder_name: used for the title and the ``local-dir:`` example when ``repo_id`` is None.
        secrets: strings (tokens) replaced by ``REDACTED`` wherever they would appear.
    """
    from huggingface_hub import ModelCard

    run = RunRecord.read(run_info, training_config, metrics)
    run.command = command or run.command
    model = _exported_model(hub_config, run)
    name = repo_id.split("/")[-1] if repo_id else folder_name
    card_data = _card_data(model, run, metrics, name)
    context = dict(
        model_title=name, **model, **_run_context(run, metrics, model),
        has_training_config=training_config is not None, plots=list(plots),
        model_ref=f"hf-hub:{repo_id}" if repo_id else f"local-dir:/path/to/{folder_name}",
        pretrained_backbone=card_data.base_model, bibtex=BIBTEX,
    )
    card = ModelCard.from_template(card_data, template_str=_card_template(), **context)
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"
    return redact(text, secrets)


def _exported_model(hub_config: Dict[str, Any], run: RunRecord) -> Dict[str, Any]:
    """What config.json says the export is: format, variant, expert, architecture, inputs, classes, prior."""
    ncl = hub_config.get("ncl") or {}
    variant = ncl.get("variant", "ensemble")
    selected = _first(ncl.get("selected_expert"), run.selected_expert)
    expert_index = _first(ncl.get("expert_index"), selected) if variant == "expert" else None
    args = hub_config.get("model_args") or {}
    pretrained_cfg = hub_config.get("pretrained_cfg") or {}
    return dict(
        fmt=ncl.get("format", "ncl"), variant=variant, selected=selected, expert_index=expert_index,
        backbone=ncl.get("backbone") or args.get("backbone") or hub_config.get("architecture"),
        num_experts=ncl.get("num_experts", args.get("num_experts", 1)),
        source_num_experts=ncl.get("source_num_experts") or 1, recorded_k=ncl.get("source_num_experts"),
        classifier=ncl.get("classifier", "linear"),
        cosine_scale=ncl.get("cosine_scale"), num_classes=hub_config.get("num_classes"),
        label_names=_named_classes(hub_config.get("label_names")), num_params=ncl.get("num_params"),
        input_size="x".join(str(s) for s in pretrained_cfg.get("input_size", ())),
        mean=pretrained_cfg.get("mean"), std=pretrained_cfg.get("std"),
        class_counts=ncl.get("class_counts") or run.class_counts,
        class_prior=describe_prior(ncl.get("class_prior"), ncl.get("prior_strength")),
        prior_estimate=args.get("prior_estimate"), calibration=_calibration_text(args.get("calibration")),
    )


_CALIBRATION_METHODS = {"bcts": "bias-corrected temperature scaling (logits / T + b)",
                        "temperature": "temperature scaling (logits / T)",
                        "none": "no map (neither a temperature nor a per-class bias lowered the NLL out of fold)"}


def _calibration_text(calibration: Optional[dict]) -> Optional[str]:
    """The model's calibration maps in words, or None."""
    if not calibration or not isinstance(calibration.get("ensemble"), dict):
        return None
    ens = calibration["ensemble"]
    fit = calibration.get("fit_split")
    where = f"on the {fit} split ({calibration.get('num_samples')} images)" if fit else "on labelled data"
    method = _CALIBRATION_METHODS.get(ens.get("method") or "bcts", "a map")
    kappa = _first(ens.get("prior_shrinkage"), calibration.get("prior_shrinkage"), 0)
    return (f"{method} fitted {where}, chosen with the shrinkage for the best prior estimates out of fold: "
            f"T = {ens['temperature']:.3f}, NLL "
            f"there {_fmt(ens.get('nll_before'), 4)} -> {_fmt(ens.get('nll_after'), 4)}; `model.predict_proba(x)` "
            f"gives the calibrated probabilities, `model.fit_class_prior(images)` estimates the class prior of "
            f"unlabelled images from them (shrinkage {kappa:g}, chosen on "
            f"{fit or 'that split'})")


def _run_context(run: RunRecord, metrics: Optional[dict], model: Dict[str, Any]) -> Dict[str, Any]:
    """The card's account of the training run and of its results."""
    variant, selected = model["variant"], model["selected"]
    this = model["expert_index"] if variant == "expert" else selected
    selection_note = _selection_note(metrics, selected, run.best_epoch)
    short_schedule = None
    if isinstance(run.epochs, (int, float)) and isinstance(run.dataset, str):
        short_schedule = next(({"epochs": run.epochs, "paper_epochs": paper} for family, paper in _PAPER_EPOCHS
                               if family in run.dataset.lower() and run.epochs < paper), None)
    return dict(
        selection=_selection_text(metrics, this, selected, model["recorded_k"]),
        selection_note=selection_note, dataset=run.dataset, dataset_hub_id=_dataset_id(run.dataset),
        imbalance_factor=_imbalance_text(run.imbalance_factor), classes=_class_summary(model["class_counts"]),
        epochs=run.epochs, best_epoch=run.best_epoch, wall_time=_duration(run.wall_time_s), loss=run.loss,
        loss_details=run.loss_details, unreadable=_unreadable_text(run.unreadable),
        command=run.command, short_schedule=short_schedule, groups=(metrics or {}).get("groups"),
        results=_results(metrics, variant, model["expert_index"], selected, selection_known=selection_note is not None),
        prior_shift=_prior_shift_table(metrics, this, "this model" if variant == "expert" else "selected"),
        prior_results_balanced=bool(metrics) and (metrics or {}).get("class_prior") is None,
    )


def _card_data(model: Dict[str, Any], run: RunRecord, metrics: Optional[dict], name: str):
    """The card's YAML front matter (huggingface_hub's ModelCardData, with the model-index of the results)."""
    from huggingface_hub import ModelCardData

    hub_id = _dataset_id(run.dataset)
    imbalance = _imbalance_text(run.imbalance_factor)
    title = str(run.dataset or "custom dataset") + (f" (imbalance factor {imbalance})" if imbalance else "")
    backbone = model["backbone"]
    return ModelCardData(
        library_name="timm", license="apache-2.0", tags=list(CARD_TAGS), datasets=[hub_id] if hub_id else None,
        base_model=_base_model(backbone, run.pretrained_backbone) if backbone else None,
        pipeline_tag="image-classification", model_name=name,
        eval_results=_eval_results(metrics, model["variant"], model["expert_index"], hub_id or run.dataset,
                                   title) or None,
    )


def _imbalance_text(imbalance: Any) -> Any:
    return f"{imbalance:g}" if isinstance(imbalance, (int, float)) else imbalance


def _prior_shift_table(metrics: Optional[dict], expert: Optional[int], expert_note: str) -> Optional[Dict[str, str]]:
    """The shifted-test-prior table of the test split (else the first split that has one), for the card."""
    splits = (metrics or {}).get("splits") or {}
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
    val = ((metrics or {}).get("splits") or {}).get("val") or {}
    tops = [e.get("top1") for e in val.get("experts") or []]
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
    if "test" in ((metrics or {}).get("splits") or {}):
        note += ("; the test numbers were not used for any selection, so they are not selection numbers (the "
                 "paper's released code picked both on the test set)")
    return note[0].upper() + note[1:] + "."
