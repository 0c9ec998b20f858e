"""Reading and writing the files of runs, checkpoints and exports: a damaged or wrong file is one clear error, and
nothing is ever left half-written.

Every reader here raises :class:`DamagedFileError` naming the file, what is wrong with it (empty, truncated, not
safetensors, not JSON or YAML, a Git LFS pointer, a pickle, ...) and what to do. Every writer writes a temporary
sibling and renames it into place (:func:`atomic_write`, :func:`atomic_folder`, :func:`swap_folder`), so a kill
mid-write leaves the previous file or folder as it was. Weights are read with safetensors or with
``torch.load(weights_only=True)``; nothing is unpickled. ``fetch_hub_file`` downloads a file from the Hugging Face
Hub and, when the copy it gets is damaged (an interrupted download left in the cache), fetches it once more with
``force_download=True``, or, offline, names the cached file to delete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, TypeVar, Union

import torch
import yaml

from .errors import UserError

__all__ = [
    "DamagedFileError", "WEIGHT_FILES", "atomic_folder", "atomic_write", "check_checkpoint_folder", "fetch_hub_file",
    "find_weights", "read_json", "read_weights", "read_yaml", "split_revision", "swap_folder", "write_json",
]

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

# weight files of an export, in the order they are looked for (timm's save_for_hf writes the first)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_LFS_POINTER = b"version https://git-lfs"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses larger headers too


class DamagedFileError(UserError, ValueError):
    """A file is damaged or is not what its name says; the message names it, the problem and the fix."""


def _size(path: Path) -> int:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path.stat().st_size


def _sniff(head: bytes) -> Optional[str]:
    """What a file that is not of the expected format looks like, from its first bytes."""
    if head.startswith(_LFS_POINTER):
        return ("a Git LFS pointer, not the file itself (the repository was cloned without git-lfs): run "
                "`git lfs pull` in it, or download the file with huggingface_hub")
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (the torch.save format), not safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    stripped = head.lstrip()
    if stripped[:1] == b"<":
        return "an HTML or XML page (an error page saved in place of the download?)"
    if stripped[:1] in (b"{", b"["):
        return "a JSON document"
    return None


def _damaged(path: Path, problem: str, fix: str) -> DamagedFileError:
    return DamagedFileError(f"{path} {problem}. {fix}".rstrip())


def _safetensors_problem(path: Path) -> Optional[str]:
    """None when ``path`` is a complete safetensors file, else what is wrong with it."""
    size = _size(path)
    if size == 0:
        return "is empty (0 bytes): an interrupted copy or download"
    with open(path, "rb") as f:
        head = f.read(8)
        if size < 8:
            return f"is truncated: {size} bytes, shorter than the 8-byte safetensors header length"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            what = _sniff(head + f.read(56))
            if what:
                return f"is not a safetensors file: it is {what}"
            if header_len <= _MAX_HEADER:
                return (f"is truncated: {size} bytes, but its header alone should be {header_len} bytes (an "
                        "interrupted copy or download)")
            return "is not a safetensors file (its first 8 bytes are not a header length)"
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError):
        return "is not a safetensors file: its header is not the JSON list of tensors that safetensors writes"
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return (f"is truncated: {size} bytes of the {expected} its header describes (an interrupted copy or "
                "download)")
    if size > expected:
        return f"has {size - expected} bytes after the tensors its header describes (two files written into one?)"
    return None


def _torch_file_problem(path: Path) -> Optional[str]:
    """None when ``path`` looks like a complete ``torch.save`` zip archive, else what is wrong with it."""
    size = _size(path)
    if size == 0:
        return "is empty (0 bytes): an interrupted copy or download"
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK"):
        return "is a truncated torch.save zip archive (no end-of-archive record): an interrupted copy or write"
    what = _sniff(head)
    if what == "a Python pickle":
        return ("is a raw Python pickle, not a torch.save zip archive: loading it would mean unpickling arbitrary "
                "objects, which ncl_hub never does (torch.load weights_only=True only)")
    if what:
        return f"is not a torch.save file: it is {what}"
    return "is not a torch.save zip archive (truncated or another format)"


def read_weights(path: PathLike, *, fix: str = "") -> Dict[str, torch.Tensor]:
    """The tensors of a weight file: ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        fix: what to do, appended to the message of a ``DamagedFileError``.

    Returns:
        name -> tensor (CPU).

    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: empty, truncated, another format, or (``.bin``) objects that need unpickling.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        problem = _safetensors_problem(path)
        if problem:
            raise _damaged(path, problem, fix)
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # a header that parses but describes impossible tensors
            raise _damaged(path, f"could not be read by safetensors ({type(e).__name__}: {e})", fix) from e
    problem = _torch_file_problem(path)
    if problem:
        raise _damaged(path, problem, fix)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for objects weights_only refuses, RuntimeError for bad zips
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _damaged(path, f"could not be loaded with torch.load(weights_only=True) ({type(e).__name__}: {first}); "
                             "ncl_hub never unpickles objects", fix) from e
    if not isinstance(state, dict):
        raise _damaged(path, f"holds a {type(state).__name__}, not a dict of tensors", fix)
    return state


def read_json(path: PathLike, *, fix: str = "", missing_ok: bool = False) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path`` (None for a missing file when ``missing_ok``).

    Raises:
        FileNotFoundError: no such file (unless ``missing_ok``).
        DamagedFileError: empty, not UTF-8 text, not JSON (with the line and column), or not a JSON object.
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return None
    data = path.read_bytes()
    if not data.strip():
        raise _damaged(path, "is empty: an interrupted copy or download", fix)
    what = _sniff(data[:64])
    if what and what != "a JSON document":
        raise _damaged(path, f"is not JSON: it is {what}", fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _damaged(path, "is not JSON: it is binary data, not UTF-8 text", fix) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        stops = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated")
        cut = " (the text stops mid-way: truncated?)" if stops else ""
        raise _damaged(path, f"is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}){cut}", fix) from None
    if not isinstance(value, dict):
        raise _damaged(path, f"holds a JSON {type(value).__name__}, not the JSON object expected", fix)
    return value


def read_yaml(path: PathLike, *, fix: str = "", missing_ok: bool = False) -> Optional[Dict[str, Any]]:
    """The YAML mapping in ``path`` (an empty file is an empty mapping; None for a missing file when
    ``missing_ok``).

    Raises:
        FileNotFoundError: no such file (unless ``missing_ok``).
        DamagedFileError: not UTF-8 text, not YAML, or not a mapping.
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return None
    data = path.read_bytes()
    try:
        value = yaml.safe_load(data.decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise _damaged(path, "is not YAML: it is binary data, not UTF-8 text", fix) from None
    except yaml.YAMLError as e:
        raise _damaged(path, f"is not valid YAML ({' '.join(str(e).split())})", fix) from None
    if not isinstance(value, dict):
        raise _damaged(path, f"holds a YAML {type(value).__name__}, not the mapping expected", fix)
    return value


# ---------------------------------------------------------------------------------------------- writing
def atomic_write(path: PathLike, content: Union[str, bytes, Callable[[Path], Any]]) -> Path:
    """Write ``path`` all at once: ``content`` (text, bytes, or a function that writes the file it is given) goes
    to a temporary sibling, which then replaces ``path`` (``os.replace``: atomic on one filesystem). On any error
    the temporary file is removed and an existing ``path`` is left as it was. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: PathLike, value: Any, *, indent: Optional[int] = 2) -> Path:
    """``value`` as JSON in ``path``, written atomically (:func:`atomic_write`)."""
    return atomic_write(path, json.dumps(value, indent=indent))


def swap_folder(new: PathLike, folder: PathLike) -> None:
    """Put the complete folder ``new`` in place of ``folder`` (which may not exist): two renames on one filesystem
    (old -> backup, new -> folder), then the backup is deleted; no moment leaves ``folder`` half-written."""
    new, folder = Path(new), Path(folder)
    backup = None
    if folder.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        backup.rmdir()
        os.rename(folder, backup)
    os.rename(new, folder)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(folder: PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``folder``; on success it replaces ``folder`` (:func:`swap_folder`).

    An exception inside the block removes the temporary folder and leaves an existing ``folder`` untouched.
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
    swap_folder(tmp, folder)


# ---------------------------------------------------------------------------------------------- exports and the Hub
def find_weights(folder: PathLike) -> Optional[Path]:
    """The weight file of an export folder: the first of ``WEIGHT_FILES`` present, else None."""
    folder = Path(folder)
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def _is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE)


def split_revision(repo_id: str) -> Tuple[str, Optional[str]]:
    """``"ORG/NAME@REV"`` -> ``("ORG/NAME", "REV")``; no ``@`` -> revision None. (timm parses its ``hf-hub:`` ids the
    same way, in a function it does not export.)"""
    repo, sep, revision = repo_id.partition("@")
    if not repo or (sep and (not revision or "@" in revision)):
        raise ValueError(f"{repo_id!r} is not a Hub repo id: expected ORG/NAME or ORG/NAME@REVISION")
    return repo, revision or None


def fetch_hub_file(repo_id: str, filename: str, read: Callable[[Path], T], *,
                   cache_dir: Optional[PathLike] = None) -> T:
    """Download ``filename`` of Hub repo ``repo_id`` (``ORG/NAME[@REV]``) and ``read`` it.

    A damaged copy (``read`` raises ``DamagedFileError``: a partial download in the Hub cache) is fetched once more
    with ``force_download=True``; offline, the error names the cached file and says to delete it. Download errors
    (no network, no such repo or file) propagate unchanged.
    """
    from huggingface_hub import hf_hub_download

    repo, revision = split_revision(repo_id)

    def download(force: bool) -> Path:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir, library_name="ncl_hub",
                                    force_download=force))

    path = download(False)
    try:
        return read(path)
    except DamagedFileError as first:
        delete = (f"It is the Hub cache's copy of '{filename}' from repo '{repo_id}': delete {path} (and, if it is a "
                  "link, the blob it points to) and load again online to download it afresh.")
        if _is_offline():
            raise DamagedFileError(f"{first} {delete} (offline: HF_HUB_OFFLINE is set, so it was not "
                                   "re-downloaded)") from first
        try:
            path = download(True)
        except Exception as e:
            raise DamagedFileError(f"{first} Downloading it again failed ({type(e).__name__}: {e}). {delete}") from e
    try:
        return read(path)
    except DamagedFileError as again:
        raise DamagedFileError(f"{again} (downloaded afresh from Hub repo '{repo_id}' and still damaged: the file "
                               "in the repo itself is damaged; upload it again)") from again


def check_checkpoint_folder(folder: PathLike) -> None:
    """Check that every file of a training checkpoint (``accelerator.save_state`` plus the trainer's JSON files)
    is complete, before ``accelerator.load_state`` reads them.

    Raises:
        DamagedFileError: the first damaged file, with what to do.
    """
    folder = Path(folder)
    fix = (f"Delete the checkpoint folder {folder} and resume again: --resume latest then continues from the "
           "previous checkpoint (or give another checkpoint folder to --resume, or start without --resume).")
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".json":
            read_json(path, fix=fix)
        elif path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                raise _damaged(path, problem, fix)
        elif path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            problem = _torch_file_problem(path)
            if problem:
                raise _damaged(path, problem, fix)
