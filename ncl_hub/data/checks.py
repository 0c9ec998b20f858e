"""Every image of a run's splits checked before the first training step: a damaged file is found before it costs
training time, named by its path (or, for an image stored inside the dataset's files, by split and row), with the
reason: missing, empty, truncated, not an image (an HTML page saved as ``.jpg``), a decompression bomb.

The check opens each image with Pillow and decodes it; a JPEG is decoded at 1/8 scale (``Image.draft``), which still
reads its whole compressed stream, so truncation is found at a fraction of a full decode's cost. The rows are checked
in parallel (DataLoader workers, ``data.num_workers``) and the result is kept in a small JSON file named by the
split's content (every row's encoded bytes, or the path, size and modification time of a file): a second run over
the same images reads it back instead of checking again.

Shapes: N rows of a split.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import torch

from .. import files
from ..config import ConfigError

__all__ = ["BadImage", "UnreadableImagesError", "check_split", "default_check_dir", "describe_row", "image_problem",
           "open_image", "unreadable_error"]

_logger = logging.getLogger(__name__)

CHECK_VERSION = "1"  # bump when what counts as unreadable changes: old records then match no key
_CHUNK = 512  # rows per worker task
_SHOWN = 20  # bad images named in an error message (all are in the record file)


@dataclass(frozen=True)
class BadImage:
    """An image that cannot be read: its split, its row in the split as loaded, where it is and why."""

    split: str
    row: int
    where: str  # the file's path, or "split 'train', row 12 (image stored in the dataset)"
    reason: str

    def line(self) -> str:
        return f"{self.where}: {self.reason}"


class UnreadableImagesError(ConfigError):
    """Images of the splits a run uses cannot be read; the message names them and the two ways on."""


def default_check_dir() -> Path:
    """``ncl_hub_checked`` beside the Hugging Face datasets cache (``$HF_DATASETS_CACHE``, else
    ``$HF_HOME/datasets``, else ``~/.cache/huggingface/datasets``)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        root = Path(os.environ["HF_DATASETS_CACHE"])
    else:
        root = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets"
    return root.expanduser().parent / "ncl_hub_checked"


# ---------------------------------------------------------------------------------------------- one image
def _sniff(head: bytes) -> str:
    """What a file that Pillow does not recognise looks like."""
    text = head.lstrip()
    if text[:1] == b"<":
        return "not an image: an HTML or XML page (a web page saved in place of the image?)"
    if text[:1] in (b"{", b"["):
        return "not an image: a JSON document"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "not an image: a text file"
    return "not an image Pillow can read"


def open_image(source: Any, *, min_side: Optional[int] = None) -> Any:
    """Open an image (bytes or a path) with Pillow and decode it; a JPEG larger than needed is decoded at a reduced
    scale (``draft``) whose shorter side stays at least ``min_side`` (None: full size). A decompression bomb
    (more pixels than Pillow's ``MAX_IMAGE_PIXELS`` allows) raises Pillow's ``DecompressionBombError``."""
    from PIL import Image

    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if min_side is not None and image.format == "JPEG" and min(image.size) > 2 * min_side:
        scale = min(image.size) / min_side
        image.draft(image.mode, (max(1, int(image.width / scale)), max(1, int(image.height / scale))))
    image.load()
    return image


def image_problem(data: Optional[bytes], path: Optional[str]) -> Optional[str]:
    """None when the image (``data``, else the file at ``path``) decodes, else why it does not."""
    from PIL import Image, UnidentifiedImageError

    if data is None:
        if not path:
            return "no image: neither bytes nor a path"
        if not os.path.isfile(path):
            return "missing: no such file"
        if os.path.getsize(path) == 0:
            return "empty: 0 bytes"
    elif len(data) == 0:
        return "empty: 0 bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            open_image(data if data is not None else path, min_side=1)
    except Image.DecompressionBombError as e:
        return f"a decompression bomb: {e}"
    except UnidentifiedImageError:
        head = data[:64] if data is not None else Path(path).read_bytes()[:64]
        return _sniff(head)
    except (OSError, SyntaxError, ValueError) as e:
        text = str(e)
        if "truncated" in text.lower() or "broken data stream" in text.lower():
            return f"truncated: the file ends before the image does ({text})"
        return f"cannot be decoded ({type(e).__name__}: {text})"
    return None


# ---------------------------------------------------------------------------------------------- a split
def _storage(dataset: Any) -> Tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(bytes [N], paths [N]) of the ``image`` column ({bytes, path} structs), without decoding anything."""
    col = dataset.with_format("arrow", columns=["image"])["image"]
    col = col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])
    names = {col.type.field(i).name for i in range(col.type.num_fields)} if pa.types.is_struct(col.type) else set()
    if names != {"bytes", "path"}:
        raise ValueError(f"the image column holds {col.type}, not encoded images ({{bytes, path}})")
    return (pa.chunked_array([c.field("bytes") for c in col.chunks], pa.binary()),
            pa.chunked_array([c.field("path") for c in col.chunks], pa.string()))


def describe_row(dataset: Any, split: str, row: int) -> str:
    """Where row ``row`` of a split's image is: the file's path, or the split and row of an image stored in the
    dataset's own files (parquet, Arrow, in memory)."""
    data, paths = _storage(dataset.select([row]))
    path = paths[0].as_py()
    if data[0].as_py() is None and path:
        return path
    return f"split {split!r}, row {row} (image stored in the dataset{f', from {path}' if path else ''})"


def _rows(data: pa.ChunkedArray, paths: pa.ChunkedArray, step: int = 4096) -> Iterator[Tuple[Optional[bytes], str]]:
    for start in range(0, len(data), step):  # slices: the bytes of a whole split are never all in Python at once
        yield from zip(data.slice(start, step).to_pylist(), paths.slice(start, step).to_pylist())


def _content_key(data: pa.ChunkedArray, paths: pa.ChunkedArray) -> str:
    digest = hashlib.sha256(f"ncl_hub image check v{CHECK_VERSION}\n{len(data)}\n".encode())
    for blob, path in _rows(data, paths):
        if blob is not None:
            digest.update(b"B" + blob)
        else:  # a file: its path, size and modification time, so a file that changed is checked again
            try:
                stat = os.stat(path) if path else None
            except OSError:
                stat = None
            digest.update(f"P{path}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}".encode())
        digest.update(b"\0")
    return digest.hexdigest()


class _Chunks(torch.utils.data.Dataset):
    """Chunk k of the split: the problems of rows k * _CHUNK ... as [(row, reason)] (checked in a worker)."""

    def __init__(self, dataset: Any):
        self.dataset, self.n = dataset, len(dataset)

    def __len__(self) -> int:
        return -(-self.n // _CHUNK)

    def __getitem__(self, k: int) -> List[Tuple[int, str]]:
        start = k * _CHUNK
        data, paths = _storage(self.dataset.select(range(start, min(self.n, start + _CHUNK))))
        found = []
        for offset, (blob, path) in enumerate(zip(data.to_pylist(), paths.to_pylist())):
            problem = image_problem(blob, path)
            if problem is not None:
                found.append((start + offset, problem))
        return found


def _check_rows(dataset: Any, num_workers: int) -> Iterator[Tuple[int, str]]:
    loader = torch.utils.data.DataLoader(_Chunks(dataset), batch_size=None, shuffle=False, num_workers=num_workers)
    for found in loader:
        yield from found


def check_split(dataset: Any, split: str, *, num_workers: int = 0, cache_dir: Optional[Path] = None,
                log=None) -> List[BadImage]:
    """Every image of ``dataset`` (a ``datasets.Dataset`` with an ``image`` column) checked by decoding it, or the
    record of an earlier check of the same images read back from ``cache_dir``.

    Args:
        dataset: the split as loaded (its rows are the rows named in messages).
        split: its name, for messages.
        num_workers: DataLoader worker processes that check chunks of rows in parallel (0: in this process).
        cache_dir: folder of the check records (default: :func:`default_check_dir`); a folder that cannot be
            written only costs the next run a new check.
        log: called with one line saying what was done (checked or read back, images, seconds).

    Returns:
        the unreadable images, in row order (empty when every image decodes).
    """
    import time

    t = time.time()
    data, paths = _storage(dataset)
    key = _content_key(data, paths)
    record = Path(cache_dir or default_check_dir()).expanduser() / f"{split}-{key[:32]}.json"
    found = _read_record(record, key)
    cached = found is not None
    if found is None:
        found = list(_check_rows(dataset, num_workers))
        _write_record(record, key, len(dataset), found)
    bad = [BadImage(split, row, describe_row(dataset, split, row), reason) for row, reason in found]
    if log is not None:
        log(f"{split}: {len(dataset)} images {'checked before (record read back)' if cached else 'checked'} "
            f"in {time.time() - t:.1f}s, {len(bad)} unreadable")
    return bad


def _read_record(path: Path, key: str) -> Optional[List[Tuple[int, str]]]:
    try:
        record = files.read_json(path, missing_ok=True)
    except files.DamagedFileError as e:  # a damaged record only costs a new check
        _logger.warning("%s; checking the images again", e)
        return None
    if not record or record.get("key") != key:
        return None
    return [(int(row), str(reason)) for row, reason in record.get("bad", [])]


def _write_record(path: Path, key: str, rows: int, found: Sequence[Tuple[int, str]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(path, {"key": key, "rows": rows, "bad": [list(x) for x in found]}, indent=None)
    except OSError as e:  # a read-only or full disk: train anyway, checking again next time
        _logger.warning("could not write the image-check record %s: %s", path, e)


def unreadable_error(bad: Sequence[BadImage], records: Sequence[Path] = ()) -> UnreadableImagesError:
    """The one error that stops a run before training: every bad image (the first ``_SHOWN`` in the message) and
    the two ways on."""
    shown = "; ".join(b.line() for b in bad[:_SHOWN])
    more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return UnreadableImagesError(
        f"{len(bad)} image(s) cannot be read: {shown}{more}. Fix or delete these files, or set "
        "--data.skip_unreadable true to leave them out (they are listed in run_info.json and the model card)")
