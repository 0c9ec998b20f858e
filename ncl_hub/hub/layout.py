"""The export folder, which follows timm's Hub layout: its file names, where a model comes from (a folder, a Hub
repo, a registered name), reading its ``config.json`` and weights (a damaged file is one error naming it and the
fix, see :mod:`ncl_hub.files`), and replacing a folder atomically.

    model.safetensors      inference weights (timm's save_for_hf); never the training-only MoCo branch
    config.json            architecture, model_args, pretrained_cfg, label_names, and an "ncl" section
    README.md              model card rendered from the package's templates/ncl_model_card.md
    training_config.yaml   the resolved training config (when given)
    *.png                  evaluation plots (when given)
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import timm
from timm.models import model_entrypoint, parse_model_name, split_model_name_tag

from .. import files
from ..models import factory
from ..models.factory import CheckpointMismatchError, WeightsUnavailableError

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "TRAINING_CONFIG_NAME", "VARIANTS", "FORMATS", "HUB_ID", "is_export",
    "is_ncl_architecture", "is_native_timm", "parse_spec", "read_config", "read_state_dict", "redact",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_CONFIG_NAME = "training_config.yaml"
VARIANTS = ("ensemble", "expert")
FORMATS = ("ncl", "timm")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOCAL_FIX = "Copy or download the export again, or export the model again (ncl_hub.hub.save_pretrained)."
_HUB_FIX = "Export and upload the model again."


def is_export(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 8:  # a token; a stray short value would corrupt the text instead
            text = text.replace(secret, "REDACTED")  # valid inside YAML, JSON and Markdown
    return text


def is_ncl_architecture(arch: Optional[str]) -> bool:
    if not arch or not timm.is_model(arch):
        return False
    return arch == "ncl" or model_entrypoint(arch).__module__ == factory.__name__


def is_native_timm(name: str) -> bool:
    """Registered by timm itself (so a plain timm install can rebuild it), not by ncl_hub or another package."""
    return timm.is_model(name) and model_entrypoint(name).__module__.startswith("timm.")


def parse_spec(spec: Union[str, os.PathLike]) -> Tuple[str, str]:
    """``("hf-hub", repo_id[@rev])``, ``("local-dir", path)`` or ``("name", timm model name)``; an existing folder
    needs no prefix. Prefixes are read by timm's ``parse_model_name``."""
    if isinstance(spec, os.PathLike) or os.path.isdir(spec):
        return "local-dir", os.fspath(spec)
    try:
        source, name = parse_model_name(spec)
    except ValueError:
        source, name = None, spec
    if source:
        return source, name
    if timm.is_model(split_model_name_tag(name)[0]):
        return "name", name
    raise ValueError(
        f"cannot load {spec!r}: it is not a folder, a registered timm model, 'hf-hub:ORG/NAME' or 'local-dir:PATH'. "
        f"For a Hub repo use 'hf-hub:{spec}'."
    )


def unavailable(repo_id: str, error: Exception, what: str = "files") -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not fetch the {what} of Hugging Face Hub repo '{repo_id}' ({type(error).__name__}: {error}). "
        f"If you are offline or the repo is not published yet, load a local export instead: "
        f"ncl_hub.hub.load_model('local-dir:/path/to/export') or "
        f"timm.create_model('local-dir:/path/to/export', pretrained=True); a cached download also works with "
        f"HF_HUB_OFFLINE=1."
    )


def read_config(source: str, location: str, cache_dir: Optional[str] = None) -> Tuple[dict, str]:
    """config.json of an export (downloaded for hf-hub) and a description of where it came from.

    A damaged config.json is a ``files.DamagedFileError`` naming it (a damaged Hub download is fetched again)."""
    if source == "hf-hub":
        try:
            cfg = files.fetch_hub_file(location, CONFIG_NAME, lambda p: files.read_json(p, fix=_HUB_FIX),
                                       cache_dir=cache_dir)
        except files.DamagedFileError:
            raise
        except Exception as e:  # offline, missing repo, network
            raise unavailable(location, e, "config.json") from e
        return _checked_config(cfg, f"config.json of Hub repo '{location}'"), f"Hub repo '{location}'"
    folder = Path(location)
    if not folder.is_dir():
        raise FileNotFoundError(f"no export folder at '{folder}'")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointMismatchError(
            f"{folder} is not an NCL or timm export: it has no {CONFIG_NAME}. Export with ncl_hub.hub.save_pretrained "
            f"or ncl_hub.hub.export_timm (timm's save_for_hf also works)."
        )
    cfg = files.read_json(folder / CONFIG_NAME, fix=LOCAL_FIX)
    return _checked_config(cfg, str(folder / CONFIG_NAME)), f"export '{folder}'"


def _checked_config(cfg: dict, where: str) -> dict:
    """An NCL config.json must name its backbone (timm would otherwise fail without naming the file)."""
    args = cfg.get("model_args")
    if cfg.get("architecture") == "ncl" and not (isinstance(args, dict) and isinstance(args.get("backbone"), str)):
        raise CheckpointMismatchError(
            f"{where} has architecture 'ncl' but no model_args.backbone (missing keys: it was edited, or written by "
            "another tool). Export the model again with ncl_hub.hub.save_pretrained.")
    return cfg


def read_state_dict(source: str, location: str, cache_dir: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Weights of an export, from safetensors, or a legacy .bin through ``torch.load(weights_only=True)``.

    A damaged weight file is a ``files.DamagedFileError`` naming it (a damaged Hub download is fetched again)."""
    if source == "hf-hub":
        try:
            return files.fetch_hub_file(location, WEIGHTS_NAME, lambda p: files.read_weights(p, fix=_HUB_FIX),
                                        cache_dir=cache_dir)
        except files.DamagedFileError:
            raise
        except Exception as e:
            raise unavailable(location, e, f"weights ({WEIGHTS_NAME})") from e
    path = files.find_weights(location)
    if path is None:
        raise WeightsUnavailableError(f"no weights in '{location}': expected {' or '.join(files.WEIGHT_FILES)}")
    return files.read_weights(path, fix=LOCAL_FIX)


def check_json_args(args: Dict[str, Any]) -> None:
    """config.json's model_args must be JSON, or ``timm.create_model('hf-hub:...')`` could not rebuild the model."""
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"model argument {key}={value!r} ({type(value).__name__}) is not JSON-serialisable, so config.json "
                f"could not rebuild the model with timm.create_model('hf-hub:...'). Build the model with a plain "
                f"value for {key!r} (a string, number, list or dict that the backbone accepts)."
            ) from e
