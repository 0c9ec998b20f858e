"""Local parquet image datasets read with pyarrow alone, for machines without the ``datasets`` package.

``sources.load_image_dataset`` uses this only when ``import datasets`` fails (a GPU machine with no network and
no ``datasets`` wheel, for example). It reads the parquet files ``datasets`` writes (``image`` as ``{bytes, path}``
structs, the ``ClassLabel`` names from the file's ``huggingface`` schema metadata) and offers the part of the
``datasets.Dataset`` interface the training data path uses: ``len``, ``column_names``, ``features["label"].names``,
``select``, ``shuffle(seed)`` (the same permutation as ``datasets``), ``with_format("arrow" | None)[column]`` and
rows ``{"image": PIL image, "label": int}``. The same files give the same rows, labels and image bytes as through
``datasets`` (``tests/test_tensor_pipeline.py`` checks it), so a long-tailed selection is the same either way.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["ArrowImageDataset", "ClassNames", "load_parquet_splits"]

_SPLIT = re.compile(r"[A-Za-z]+")
_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


class ClassNames:
    """The ``label`` feature: class names, as ``datasets.ClassLabel`` exposes them."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ClassNames({len(self.names)} classes)"


class ImageColumn:
    """The ``image`` feature: encoded images (``{bytes, path}``), decoded when a row is read."""

    def __repr__(self) -> str:
        return "ImageColumn()"


class ArrowImageDataset:
    """Rows ``indices`` of a table with ``image`` ({bytes, path}) and ``label`` (int64) columns.

    Args:
        table: the whole split.
        class_names: C names; labels are 0..C-1.
        indices: the rows of ``table`` this dataset holds, in order (default: all).
        base_dir: folder that relative image paths are read from.
    """

    column_names = ["image", "label"]

    def __init__(self, table: pa.Table, class_names: Sequence[str], indices: Optional[np.ndarray] = None,
                 base_dir: Optional[Path] = None):
        self.table = table
        self.features = {"image": ImageColumn(), "label": ClassNames(class_names)}
        self._indices = np.arange(table.num_rows) if indices is None else np.asarray(indices, dtype=np.int64)
        self.base_dir = base_dir

    def __len__(self) -> int:
        return int(self._indices.shape[0])

    def __repr__(self) -> str:
        return f"ArrowImageDataset(num_rows={len(self)}, classes={self.features['label'].num_classes})"

    def select(self, indices: Union[Sequence[int], np.ndarray, range]) -> "ArrowImageDataset":
        return ArrowImageDataset(self.table, self.features["label"].names,
                                 self._indices[np.asarray(indices, dtype=np.int64)], self.base_dir)

    def shuffle(self, seed: int) -> "ArrowImageDataset":
        """The rows in a random order: ``np.random.default_rng(seed).permutation``, as ``datasets.Dataset.shuffle``."""
        return self.select(np.random.default_rng(seed).permutation(len(self)))

    def with_format(self, type: Optional[str] = None, columns: Optional[List[str]] = None) -> "_Formatted":
        if type not in (None, "arrow"):
            raise ValueError(f"format {type!r} is not supported without the datasets package (None or 'arrow')")
        return _Formatted(self, type)

    def column(self, name: str) -> pa.ChunkedArray:
        """Column ``name`` of the selected rows, in order."""
        return self.table.column(name).take(pa.array(self._indices))

    def __getitem__(self, key: Union[int, str]) -> Any:
        if isinstance(key, str):
            return self.column(key).to_pylist()
        row = int(self._indices[key])
        image = self.table.column("image")[row].as_py()
        return {"image": self._decode(image, row), "label": int(self.table.column("label")[row].as_py())}

    def _decode(self, image: Dict[str, Any], row: int) -> Any:
        from PIL import Image

        if image.get("bytes") is not None:
            decoded = Image.open(io.BytesIO(image["bytes"]))
        elif image.get("path"):
            path = Path(image["path"]).expanduser()
            decoded = Image.open(path if path.is_absolute() or self.base_dir is None else self.base_dir / path)
        else:
            raise ValueError(f"row {row} has neither image bytes nor a path")
        decoded.load()
        return decoded


class _Formatted:
    """``dataset.with_format(type)``: columns as Arrow arrays ("arrow") or Python lists (None); rows decoded."""

    def __init__(self, dataset: ArrowImageDataset, type: Optional[str]):
        self.dataset, self.type = dataset, type

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Union[int, str]) -> Any:
        if isinstance(key, str) and self.type == "arrow":
            return self.dataset.column(key)
        return self.dataset[key]


def _split_files(folder: Path) -> Dict[str, List[str]]:
    """Parquet files by split: ``train.parquet``, ``test-00000-of-00001.parquet``, ``data/train-*.parquet`` or
    ``train/*.parquet`` (the split is the file's leading word, or its folder's)."""
    splits: Dict[str, List[str]] = {}
    for path in sorted(folder.rglob("*.parquet")):
        rel = path.relative_to(folder)
        named_by_folder = len(rel.parts) > 1 and rel.parts[-2] not in ("data",)
        word = _SPLIT.match(rel.parts[-2] if named_by_folder else path.stem)
        if word:
            splits.setdefault(word.group(0), []).append(str(path))
    return splits


def _class_names(schema: pa.Schema, label_column: str) -> Optional[List[str]]:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    feature = json.loads(meta).get("info", {}).get("features", {}).get(label_column, {})
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" and "names" in feature else None


def _pick(columns: Sequence[str], given: Optional[str], candidates: Sequence[str], what: str) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(f"no {what} column {given!r}: columns found: {list(columns)}")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise ValueError(f"no {what} column among {list(candidates)}: columns found: {list(columns)}")
    return found


def _image_struct(col: pa.ChunkedArray) -> pa.ChunkedArray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_struct(col.type):
        n = len(col)
        names = {col.type.field(i).name for i in range(col.type.num_fields)}
        data = col.field("bytes").cast(pa.binary()) if "bytes" in names else pa.nulls(n, pa.binary())
        paths = col.field("path").cast(pa.string()) if "path" in names else pa.nulls(n, pa.string())
    elif pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        data, paths = col.cast(pa.binary()), pa.nulls(len(col), pa.string())
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        data, paths = pa.nulls(len(col), pa.binary()), col.cast(pa.string())
    else:
        raise ValueError(f"the image column holds {col.type}, not images ({{bytes, path}} structs, bytes or paths)")
    return pa.chunked_array([pa.StructArray.from_arrays([data, paths], fields=list(_STRUCT))])


def load_parquet_splits(source: Union[str, Path], image_column: Optional[str] = None,
                        label_column: Optional[str] = None) -> Dict[str, ArrowImageDataset]:
    """The splits of a local parquet dataset (a ``.parquet`` file: the train split; or a folder, splits named as in
    ``_split_files``), as :class:`ArrowImageDataset` objects with ``image`` and ``label``.

    Labels: the ``ClassLabel`` names stored in the files' ``huggingface`` metadata, else integer class indices
    (names "0".."C-1", C = the largest label + 1 over all splits). Class names as strings need ``datasets``.
    """
    from .sources import IMAGE_COLUMNS, LABEL_COLUMNS

    path = Path(source).expanduser()
    if path.is_file():
        files, base = {"train": [str(path)]}, path.parent
    elif path.is_dir():
        files, base = _split_files(path), path
    else:
        raise FileNotFoundError(f"{source} does not exist (without the datasets package, only local parquet files "
                                "and folders of them can be read)")
    if not files:
        raise ValueError(f"{source} holds no parquet files (without the datasets package, only parquet is read)")
    tables, names = {}, None
    for split, paths in files.items():
        table = pa.concat_tables([pq.read_table(p) for p in paths])
        img = _pick(table.column_names, image_column, IMAGE_COLUMNS, "image")
        lab = _pick(table.column_names, label_column, LABEL_COLUMNS, "label")
        if not pa.types.is_integer(table.schema.field(lab).type):
            raise ValueError(f"labels of split {split!r} are {table.schema.field(lab).type}: without the datasets "
                             "package, labels must be integer class indices")
        names = names or _class_names(table.schema, lab)
        tables[split] = pa.table({"image": _image_struct(table.column(img)),
                                  "label": table.column(lab).cast(pa.int64())})
    if names is None:
        top = max(int(pc.max(t.column("label")).as_py() or 0) for t in tables.values())
        names = [str(i) for i in range(top + 1)]
    return {split: ArrowImageDataset(table, names, base_dir=base.resolve()) for split, table in tables.items()}
