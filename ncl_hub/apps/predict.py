"""Predicting the classes of images with a trained model (the logic of ``recipes/predict.py``): a folder, files,
globs, a parquet file or a ``datasets`` folder in; one CSV row per image out (its path, the top-k classes and their
probabilities), optionally for a class prior estimated from the images themselves.

The model runs once over the images (batched, on the GPU when there is one); its raw logits are kept, so that
``--class-prior estimate`` needs no second pass: the prior is estimated from the calibrated logits by EM
(:func:`ncl_hub.priors.estimate_prior`), then every image's probabilities are those of the model deployed with it.
An image that cannot be read is skipped and listed by path at the end, never a crash.
"""
from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import datasets
import torch
from accelerate import Accelerator

from .. import files, hub
from ..config import ConfigError
from ..data.checks import image_problem
from ..data.columns import IMAGE_COLUMNS
from ..data.transforms import decode_min_side, eval_transform, load_stored_image, to_rgb
from ..models import NCLModel
from ..priors import check_prior_strength, load_prior_file

__all__ = ["IMAGE_SUFFIXES", "PredictOptions", "collect_images", "predict_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
_STORED = datasets.Features({"image": datasets.Image(decode=False), "name": datasets.Value("string")})


@dataclass
class PredictOptions:
    """recipes/predict.py: which model, which images, where the predictions go, under which class prior"""

    model: str
    """a training output folder, an export folder, or a Hub model (hf-hub:ORG/NAME)"""
    input: List[str] = field(default_factory=list)
    """images: folders (searched recursively), image files or globs, parquet files, or datasets folders
    (save_to_disk)"""
    output: str = "predictions.csv"
    """the CSV written: path, then class and probability of the top-k classes"""
    top_k: int = 5
    """classes per image in the CSV"""
    class_prior: Optional[str] = None
    """train | uniform | estimate (from these images, by EM on the calibrated probabilities) | FILE.json (a JSON
    list of C numbers, or the file --class-prior estimate writes); default: the prior saved with the model"""
    prior_strength: Optional[float] = None
    """tau of the class prior (default: the model's, else 1)"""
    prior_out: Optional[str] = None
    """with --class-prior estimate: the JSON file of the estimated prior (default: OUTPUT with .prior.json)"""
    batch_size: int = 64
    """images per batch"""
    num_workers: int = 2
    """DataLoader worker processes that read and decode the images"""
    calibrated: bool = True
    """probabilities from the model's calibrated logits (when it carries a calibration)"""


# ---------------------------------------------------------------------------------------------- the images
def _files(root: Path) -> List[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _table_images(path: Path) -> datasets.Dataset:
    """The images of a parquet file or a ``datasets`` folder (every split), named by file (or split) and row."""
    if path.is_file():
        parts = {path.name: datasets.load_dataset("parquet", data_files=str(path), split="train")}
    else:
        loaded = datasets.load_from_disk(str(path))
        parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {path.name: loaded}
    tables = []
    for part, ds in parts.items():
        column = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
        if column is None:
            raise ConfigError(f"{path} ({part}) has no image column (looked for {', '.join(IMAGE_COLUMNS)}; "
                              f"columns found: {ds.column_names})")
        ds = ds.select_columns([column]).rename_column(column, "image") if column != "image" else \
            ds.select_columns(["image"])
        ds = ds.cast_column("image", datasets.Image(decode=False))
        names = [f"{path}{'' if path.is_file() else f' ({part})'}, row {i}" for i in range(len(ds))]
        tables.append(ds.add_column("name", names).cast(_STORED))
    return datasets.concatenate_datasets(tables)


def collect_images(inputs: Sequence[str]) -> datasets.Dataset:
    """Every image the inputs name, as a Dataset with ``image`` (stored ``{bytes, path}``, not decoded) and
    ``name`` (the path, or parquet / datasets file and row), in the order given (folders sorted).

    Raises:
        ConfigError: an input that does not exist, or no image at all.
    """
    paths: List[str] = []
    tables = []
    for item in inputs:
        matches = sorted(glob.glob(os.path.expanduser(item))) if glob.has_magic(item) else [os.path.expanduser(item)]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise ConfigError(f"input {item!r} does not exist: give image folders, image files or globs, parquet "
                              "files or datasets folders")
        for match in map(Path, matches):
            if match.is_file() and match.suffix.lower() == ".parquet":
                tables.append(_table_images(match))
            elif match.is_dir() and ((match / "dataset_dict.json").exists() or (match / "state.json").exists()):
                tables.append(_table_images(match))
            else:
                paths += _files(match) if match.is_dir() else [str(match)]
    if paths:
        rows = {"image": [{"bytes": None, "path": str(Path(p).resolve())} for p in paths], "name": paths}
        tables.insert(0, datasets.Dataset.from_dict(rows, features=_STORED))
    if not tables or not sum(len(t) for t in tables):
        raise ConfigError(f"no images in {', '.join(inputs)} (image files end in {', '.join(IMAGE_SUFFIXES)})")
    return datasets.concatenate_datasets(tables) if len(tables) > 1 else tables[0]


class _Images(torch.utils.data.Dataset):
    """Decoded, transformed images; one that cannot be read gives ``ok`` False and the reason (never raises)."""

    def __init__(self, images: datasets.Dataset, transform, min_side: int, shape: Tuple[int, ...]):
        self.images, self.transform, self.min_side, self.shape = images, transform, min_side, shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        stored = self.images[index]["image"]
        try:
            x = self.transform(to_rgb(load_stored_image(stored, self.min_side)))
            return {"pixel_values": x, "index": index, "ok": True, "reason": ""}
        except Exception as e:  # a damaged, empty or foreign file: listed at the end, never fatal
            reason = image_problem(stored.get("bytes"), stored.get("path")) or f"{type(e).__name__}: {e}"
            return {"pixel_values": torch.zeros(self.shape), "index": index, "ok": False, "reason": reason}


# ---------------------------------------------------------------------------------------------- the model
def _load(spec: str) -> NCLModel:
    """A run folder's exported ensemble (else its best/), an export folder, or a Hub model."""
    path = Path(spec)
    for candidate in (path / "export" / "ensemble", path / "best"):
        if (candidate / "config.json").is_file():
            spec = f"local-dir:{candidate}"
            break
    try:
        return hub.load_model(spec).train(False)
    except (files.DamagedFileError, hub.CheckpointMismatchError, hub.WeightsUnavailableError) as e:
        raise ConfigError(f"cannot load the model {spec}: {e}") from e
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cannot load the model {spec}: {e}. Give a training output folder, an export folder or "
                          "hf-hub:ORG/NAME") from e


@torch.no_grad()
def _raw_logits(model: NCLModel, images: datasets.Dataset, opts: PredictOptions, log) -> Tuple[torch.Tensor, list]:
    """The raw ensemble logits [N_ok, C] (CPU, float32) of the readable images, their rows in ``images``, and the
    unreadable ones as ``[(name, reason)]``."""
    from tqdm.auto import tqdm

    device = Accelerator().device  # Accelerate places the model (CPU, one GPU, MPS), as in evaluate
    model.to(device)
    cfg = model.pretrained_cfg
    shape = (3, *tuple(cfg.get("input_size", (3, 224, 224)))[-2:])
    loader = torch.utils.data.DataLoader(_Images(images, eval_transform(cfg), decode_min_side(cfg), shape),
                                         batch_size=opts.batch_size, num_workers=opts.num_workers)
    logits, rows, bad = [], [], []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not log):
        ok = batch["ok"]
        for i, reason in zip(batch["index"][~ok].tolist(), [r for r, good in zip(batch["reason"], ok) if not good]):
            bad.append((images[i]["name"], reason))
        if ok.any():
            x = batch["pixel_values"][ok].to(device)
            logits.append(model.raw_logits(x).float().cpu())
            rows += batch["index"][ok].tolist()
    empty = torch.zeros(0, model.num_classes)
    return (torch.cat(logits) if logits else empty), rows, bad


# ---------------------------------------------------------------------------------------------- the prior
def _prior_option(model: NCLModel, opts: PredictOptions) -> Tuple[Any, float]:
    """The prior (``None`` for the model's own, ``"estimate"``, a name or C numbers) and tau of the options, checked
    before any image is read."""
    strength = model.prior_strength if opts.prior_strength is None else opts.prior_strength
    prior: Any = opts.class_prior
    try:
        check_prior_strength(strength)
        if prior not in (None, "estimate", "train", "uniform"):
            prior = load_prior_file(prior, class_names=model.label_names)
        if prior not in (None, "estimate"):
            NCLModel.set_class_prior(model, prior, strength)  # validates it against the model; set again later
    except ValueError as e:
        raise ConfigError(f"--class-prior / --prior-strength: {e}") from e
    return prior, strength


def _prior_table(estimate, names: List[str], training: Optional[List[float]], limit: int = 30) -> List[str]:
    order = sorted(range(len(names)), key=lambda c: -float(estimate.prior[c]))
    total = sum(training) if training else None
    converged = "" if estimate.converged else ", not converged"
    lines = [f"class prior estimated from {estimate.num_samples} images (EM on calibrated probabilities, shrinkage "
             f"{estimate.shrinkage:g}, {estimate.iterations} iterations{converged}, effective sample size "
             f"{estimate.effective_sample_size:.0f}); classes by estimated share:", "",
             "| class | estimated | training |", "|---|---:|---:|"]
    for c in order[:limit]:
        train = f"{100 * training[c] / total:.1f} %" if training else "n/a"
        lines.append(f"| {names[c]} | {100 * float(estimate.prior[c]):.1f} % | {train} |")
    if len(order) > limit:
        lines.append(f"| ... {len(order) - limit} more classes in the JSON file | | |")
    return lines


def _write_prior(path: Path, estimate, names: List[str], training: Optional[List[float]]) -> Path:
    """The estimated prior as JSON that ``--class-prior FILE.json`` and ``create_model(class_prior=...)`` read."""
    record = {"prior": [float(p) for p in estimate.prior.tolist()], "class_names": names,
              **{k: v for k, v in estimate.to_dict().items() if k != "prior"},
              "training_counts": list(training) if training else None}
    return files.write_json(path, record)


# ---------------------------------------------------------------------------------------------- the run
def _write_csv(path: Path, names: List[str], images: datasets.Dataset, rows: List[int], probs: torch.Tensor,
               top_k: int) -> Path:
    k = min(top_k, probs.shape[1])
    values, classes = probs.topk(k, dim=1) if len(rows) else (probs[:, :0], probs[:, :0].long())
    header = ["path"] + [f"{what}_{i + 1}" for i in range(k) for what in ("class", "prob")]
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(header)
            for j, row in enumerate(rows):
                cells = [images[row]["name"]]
                for c, p in zip(classes[j].tolist(), values[j].tolist()):
                    cells += [names[c], f"{p:.6f}"]
                out.writerow(cells)

    return files.atomic_write(path, write)


def predict_images(opts: PredictOptions, log=print) -> Dict[str, Any]:
    """Predict every image of ``opts.input`` with ``opts.model`` and write ``opts.output`` (see the module
    docstring). ``log`` gets the progress bar, the estimated prior and the unreadable images (None: silent).

    Returns:
        ``{"output", "images", "predicted", "unreadable": [(name, reason)], "prior_file", "estimate"}``.
    """
    if opts.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {opts.top_k}")
    model = _load(opts.model)
    prior, strength = _prior_option(model, opts)
    images = collect_images(opts.input)
    logits, rows, bad = _raw_logits(model, images, opts, log)
    names = model.class_names
    estimate, prior_file = None, None
    if prior == "estimate":
        if not rows:
            raise ConfigError("no readable image to estimate the class prior from")
        estimate = model.fit_class_prior(logits=logits, strength=strength)
        prior_file = _write_prior(Path(opts.prior_out or Path(opts.output).with_suffix(".prior.json")), estimate,
                                  names, model.class_counts)
        for line in (_prior_table(estimate, names, model.class_counts) + ["", f"wrote {prior_file}"]) if log else ():
            log(line)
    elif prior is not None:
        model.set_class_prior(prior, strength)
    probs = model.probabilities(logits, calibrated=opts.calibrated)
    output = _write_csv(Path(opts.output), names, images, rows, probs, opts.top_k)
    if log:
        log(f"wrote {output}: {len(rows)} of {len(images)} images")
        if bad:
            log(f"{len(bad)} image(s) could not be read and were skipped:")
            for name, reason in bad:
                log(f"  {name}: {reason}")
    return {"output": str(output), "images": len(images), "predicted": len(rows), "unreadable": bad,
            "prior_file": str(prior_file) if prior_file else None, "estimate": estimate}
