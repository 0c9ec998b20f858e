"""Evaluating a saved model (the logic of ``recipes/evaluate.py``): a training output folder or an export, on any
split of its data (rebuilt from the run's configuration), under any class prior, written as a report. It starts
Accelerate, builds data and loads models, so it sits above the library's layers, not in :mod:`ncl_hub.evaluate`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from accelerate import Accelerator

from .. import files, hub
from ..calibration import fit_model_calibration
from ..cli import read_yaml
from ..config import ConfigError, RunConfig, apply_overrides, config_from_dict, load_config
from ..data import build_data, build_eval_loader
from ..evaluate import evaluate_predictions, format_summary, predict, record_absent_classes, write_report
from ..models import WeightsUnavailableError
from ..priors import check_prior_strength, load_prior_file, resolve_prior

__all__ = ["EvaluateOptions", "SavedRun", "evaluate_run", "open_run", "predict_splits"]


@dataclass
class EvaluateOptions:
    """recipes/evaluate.py: what to evaluate, on which splits, under which class prior

    Any training key (``--data.dataset``, ...) overrides the run's saved configuration.
    """

    path: str
    """a training output folder (config.yaml + best/) or an export folder (config.json)"""
    split: List[str] = field(default_factory=lambda: ["test"])
    """splits to evaluate (give --split once per split)"""
    out: Optional[str] = None
    """report folder (default: PATH/eval_<splits>)"""
    batch_size: Optional[int] = None
    """images per batch (default: the run's data.eval_batch_size)"""
    class_prior: Optional[str] = None
    """train | uniform | FILE (a JSON list or a text file of C numbers): evaluate the model deployed with
    logits + tau * log(prior); default: the prior saved with the model, if any"""
    prior_strength: Optional[float] = None
    """tau of the class prior (default: the model's, else 1)"""
    calibrate_on: Optional[str] = None
    """a labelled split (e.g. val) to fit the calibration on before evaluating, replacing the model's own;
    default: the calibration saved with the model, if any"""


def evaluate_run(path, *, splits: Optional[List[str]] = None, out_dir=None, overrides: Optional[Dict[str, Any]] = None,
                 batch_size: Optional[int] = None, class_prior: Optional[str] = None,
                 prior_strength: Optional[float] = None, calibrate_on: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate a training output folder (its best/ model) or an export folder on any split.

    The data are rebuilt from the run's saved configuration (the same seeded long-tailed split and
    validation hold-out), overridable with ``overrides`` (``{"data.dataset": ...}``, keys as on the command line);
    the class counts are those saved with the run (the counts the model was trained on).

    ``class_prior`` evaluates the model deployed with a class prior (``NCLModel.set_class_prior``): ``"train"``,
    ``"uniform"`` or a file of C numbers (``priors.load_prior_file``); None keeps the one saved with the model (if
    any). ``prior_strength``: its tau (None: the model's). The model runs once, without prior: the metrics add the
    prior to the stored logits, and so do the prior-shift numbers for each test prior.

    ``calibrate_on``: a labelled split to fit the calibration (BCTS) and the prior-estimation shrinkage on first,
    in place of the model's own; the calibrated and estimated-prior numbers then use it.
    """
    path = Path(path)
    splits = list(splits or ["test"])
    needed = list(dict.fromkeys(splits + ([calibrate_on] if calibrate_on else [])))
    run = open_run(path, needed, overrides=overrides)  # the images of every split needed checked first
    model, counts = run.model, run.class_counts
    prior, strength = _evaluation_prior(model, class_prior, prior_strength, counts)
    accelerator = Accelerator()
    predictions = predict_splits(run, needed, accelerator, batch_size=batch_size)
    if calibrate_on:
        model.set_calibration(fit_model_calibration(*predictions[calibrate_on], split=calibrate_on,
                                                    class_counts=counts))
    predictions = {name: predictions[name] for name in splits}
    metrics = evaluate_predictions(predictions, counts, selected_expert=run.selected_expert,
                                   class_prior=prior, prior_strength=strength, calibration=model.calibration)
    for line in record_absent_classes(metrics, run.splits, run.data.class_names):
        accelerator.print(line)
    out = Path(out_dir) if out_dir else path / f"eval_{'_'.join(splits)}"
    if accelerator.is_main_process:
        write_report(metrics, out, title=f"NCL evaluation of {path.name}")
        accelerator.print(format_summary(metrics, title=f"NCL evaluation of {path.name}"))
        accelerator.print(f"wrote {out}")
    return metrics


@dataclass
class SavedRun:
    """A saved model opened for evaluation with its data: what :func:`evaluate_run` evaluates, for scripts that
    need the model's predictions rather than its report (``benchmarks/calibration_split.py``)."""

    config: RunConfig
    model: Any
    """the loaded ``NCLModel`` (its saved class prior and calibration still set)"""
    data: Any
    """the ``DataBundle`` rebuilt from the run's configuration"""
    class_counts: List[int]
    """training images per class the model was trained on (saved with it; else the rebuilt data's)"""
    selected_expert: Optional[int]
    """the expert selected on validation (0 for one expert; None when the run did not record one)"""

    @property
    def splits(self) -> Dict[str, Any]:
        return {"train": self.data.train, "val": self.data.val, "test": self.data.test}


def open_run(path, splits: List[str], *, overrides: Optional[Dict[str, Any]] = None) -> SavedRun:
    """Load a training output folder (its best/ model) or an export folder, and rebuild its data from the run's
    saved configuration (``overrides`` as in :func:`evaluate_run`), checking the images of ``splits`` first."""
    path = Path(path)
    cfg, model_dir = _saved_run(path)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    counts = _read_run_json(model_dir / "config.json").get("ncl", {}).get("class_counts")
    model = _load_for_evaluation(model_dir)
    data = build_data(cfg, check=list(splits))
    run_info = path / "run_info.json"
    selected = 0 if model.num_experts == 1 else (
        _read_run_json(run_info).get("selected_expert") if run_info.is_file() else None)
    return SavedRun(cfg, model, data, list(counts or data.class_counts), selected)


def predict_splits(run: SavedRun, splits: List[str], accelerator: Accelerator, *,
                   batch_size: Optional[int] = None) -> Dict[str, Tuple[Any, Any]]:
    """The raw expert logits [K, N, C] (no class prior, no calibration) and labels [N] of the run's model on each
    split, by name; a split the data do not have is a ConfigError naming those it has."""
    run.model.set_class_prior(None)
    run.model.to(accelerator.device)
    predictions = {}
    for name in dict.fromkeys(splits):
        if run.splits.get(name) is None:
            have = [k for k, v in run.splits.items() if v is not None]
            raise ConfigError(f"split {name!r} is not available; have {have}")
        loader = build_eval_loader(run.config, run.splits[name], run.model.pretrained_cfg, batch_size or 0,
                                   split=name)
        predictions[name] = predict(run.model, accelerator.prepare(loader), accelerator)
    return predictions


def _saved_run(path: Path) -> Tuple[RunConfig, Path]:
    """The configuration a training output folder or an export was trained with, and the folder of its model."""
    if (path / "config.yaml").is_file() and (path / "best").is_dir():
        return load_config(path / "config.yaml"), path / "best"
    if (path / "config.json").is_file():
        saved = path / "training_config.yaml"
        return (config_from_dict(read_yaml(saved)) if saved.is_file() else RunConfig()), path
    raise ConfigError(f"{path} is neither a training output folder (config.yaml + best/) nor an export "
                      "folder (config.json)")


def _evaluation_prior(model, class_prior: Optional[str], prior_strength: Optional[float], class_counts: List[int]):
    """(prior, tau) that evaluate_run deploys the model with, checked before any image is read."""
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
    try:
        return files.read_json(path, fix="Copy the folder again, or re-run the export / training that wrote it.")
    except files.DamagedFileError as e:
        raise ConfigError(str(e)) from e


def _load_for_evaluation(model_dir: Path):
    """``hub.load_model`` of the folder to evaluate; a damaged or mismatched file is a ConfigError naming it."""
    try:
        return hub.load_model(f"local-dir:{model_dir}")
    except (files.DamagedFileError, hub.CheckpointMismatchError, WeightsUnavailableError) as e:
        raise ConfigError(f"cannot load the model in {model_dir}: {e}") from e
