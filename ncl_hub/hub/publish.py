"""Publishing a training run as two Hub repos: the ensemble (``repo_id``) and the expert selected on the validation
split (``f"{repo_id}-expert"``), staged under ``OUTPUT_DIR/publish/`` with every token redacted."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Optional, Sequence, Union

from .. import files
from ..config import ConfigError
from ..models import NCLModel
from .card import render_model_card
from .export import export_timm, resolve_expert_index, save_pretrained
from .layout import CONFIG_NAME, FORMATS, HUB_ID, WEIGHTS_NAME, is_export, redact
from .load import load_model

__all__ = ["PublishOptions", "publish"]

_logger = logging.getLogger(__name__)


@dataclass
class PublishOptions:
    """recipes/publish.py: which run to publish, where, and how"""

    output_dir: str
    """training output folder (best/, eval/, run_info.json, export/)"""
    repo_id: str
    """Hub repo of the ensemble, ORG/NAME; the expert goes to ORG/NAME-expert"""
    private: bool = False
    """create private repos"""
    dry_run: bool = False
    """only stage the folders under OUTPUT_DIR/publish/"""
    format: Literal["ncl", "timm"] = "ncl"
    """format of the expert repo: ncl (needs `import ncl_hub`) or a plain timm model"""
    commit_message: Optional[str] = None
    """commit message of both uploads"""


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
        raise ConfigError(f"unknown format {format!r}; choose one of {FORMATS}")
    if not HUB_ID.match(repo_id):
        raise ConfigError(f"repo_id must look like 'ORG/NAME', got {repo_id!r}")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ConfigError(f"{output_dir} is not a training output folder (no such folder): give the output_dir of a "
                          "finished training run")
    resolved_token = None if dry_run else _resolve_token(token)
    if not dry_run and not resolved_token:
        raise ConfigError("no Hugging Face token: pass token=..., set HF_TOKEN, or run `hf auth login`")
    # redact every token this process could hold, also in dry runs (a token pasted into the training command)
    secrets = [s for s in (token, resolved_token, os.environ.get("HF_TOKEN"),
                           os.environ.get("HUGGING_FACE_HUB_TOKEN")) if s]
    repos = {"ensemble": repo_id, "expert": f"{repo_id}-expert"}
    folders = _stage(output_dir, repos, format, secrets)
    result: Dict[str, Any] = {"dry_run": dry_run, "format": format}
    for name in ("ensemble", "expert"):
        result[name] = {"repo_id": repos[name], "folder": str(folders[name]), "url": None, "commit": None}
    if not dry_run:
        _upload(result, folders, resolved_token, private=private, format=format, commit_message=commit_message)
    return result


def _stage(output_dir: Path, repos: Dict[str, str], format: str, secrets: Sequence[str]) -> Dict[str, Path]:
    """The two repo folders under ``output_dir/publish/``: copies of ``export/`` (cards for the repo ids) or exports
    of the best model, the expert first (a trunk or head that ``--format timm`` refuses fails before anything is
    staged); text files redacted."""
    run_info = files.read_json(output_dir / "run_info.json", missing_ok=True) or {}
    metrics = files.read_json(output_dir / "eval" / "metrics.json", missing_ok=True)
    training_config = files.read_yaml(output_dir / "config.yaml", missing_ok=True)
    command = redact(run_info["command"], secrets) if run_info.get("command") else None
    common = dict(metrics=metrics, config=training_config, class_names=run_info.get("class_names"),
                  class_counts=run_info.get("class_counts") or (metrics or {}).get("class_counts"),
                  plots_dir=output_dir / "eval", command=command, run_info=run_info)
    card = dict(metrics=metrics, training_config=training_config, run_info=run_info, secrets=secrets)
    stage, export = output_dir / "publish", output_dir / "export"
    trained = _lazy_model(output_dir)
    folders: Dict[str, Path] = {}
    if format == "timm":
        selected = resolve_expert_index(None, metrics or {}, run_info)
        folders["expert"] = export_timm(trained(), stage / "expert", expert_index=selected, repo_id=repos["expert"],
                                        **common)
    for name in ("expert", "ensemble"):
        if name in folders:
            continue
        if is_export(export / name):
            folders[name] = _stage_copy(export / name, stage / name, repo_id=repos[name], **card)
        else:
            folders[name] = save_pretrained(trained(), stage / name, variant=name, repo_id=repos[name], **common)
    for folder in folders.values():  # the built folders hold the training config and the command too
        _redact_folder(folder, secrets)
    return folders


def _lazy_model(output_dir: Path) -> Callable[[], NCLModel]:
    """The trained ensemble (export/ensemble, else best/), loaded on first use only."""
    cache: Dict[str, NCLModel] = {}

    def model() -> NCLModel:
        if "model" not in cache:
            export = output_dir / "export" / "ensemble"
            source = export if is_export(export) else output_dir / "best"
            if not is_export(source):
                raise ConfigError(f"no model in {output_dir}: expected export/ensemble/ or best/ with {CONFIG_NAME} "
                                  f"and {WEIGHTS_NAME} (is it the output folder of a finished training run?)")
            cache["model"] = load_model(source).train(False)
        return cache["model"]

    return model


def _upload(result: Dict[str, Any], folders: Dict[str, Path], token: str, *, private: bool, format: str,
            commit_message: Optional[str]) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="ncl_hub")
    for name in ("ensemble", "expert"):
        url = api.create_repo(result[name]["repo_id"], exist_ok=True, private=private, repo_type="model")
        message = commit_message or f"Upload NCL {name} ({format} format) with ncl_hub"
        info = api.upload_folder(repo_id=url.repo_id, folder_path=str(folders[name]), commit_message=message,
                                 repo_type="model")
        result[name].update(repo_id=url.repo_id, url=str(url), commit=getattr(info, "oid", None))
        _logger.info("published %s to %s", name, url)


def _resolve_token(token: Optional[str]) -> Optional[str]:
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()  # HF_TOKEN, then the token saved by `hf auth login`


def _stage_copy(src: Path, dst: Path, *, repo_id: str, metrics, training_config, run_info, secrets) -> Path:
    """Copy an existing export, re-rendering its card for ``repo_id``, and redact secrets from text files."""
    hub_config = files.read_json(src / CONFIG_NAME)
    with files.atomic_folder(dst) as tmp:
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
                item.write_text(redact(text, secrets), encoding="utf-8")
