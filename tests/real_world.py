"""Images and datasets as people have them, for the tests: every PIL mode a decoder hands out, odd sizes, EXIF-rotated
photos, label columns of every kind, images as structs, bytes or relative paths."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

ORIENTATION = 0x0112


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _palette_with_transparency(w: int, h: int, seed: int) -> Image.Image:
    img = Image.fromarray(_pixels(h, w, seed)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 0
    return img


def _exif_rotated(w: int, h: int, seed: int) -> Tuple[Image.Image, dict]:
    """A w x h JPEG whose EXIF says 'rotate 90 degrees clockwise to view' (a phone photo held upright)."""
    img = Image.fromarray(_pixels(h, w, seed))
    exif = img.getexif()
    exif[ORIENTATION] = 6
    return img, {"exif": exif.tobytes()}


def odd_images(seed: int = 0) -> Dict[str, Tuple[Image.Image, str, dict]]:
    """name -> (image, file format, save options): one of each mode and of each awkward size."""
    gray16 = (np.random.default_rng(seed).integers(0, 65536, (48, 64))).astype(np.uint16)
    rotated, rotated_opts = _exif_rotated(60, 20, seed)
    return {
        "gray_40x28": (Image.fromarray(_pixels(28, 40, seed)).convert("L"), "PNG", {}),
        "rgba_17x50": (Image.fromarray(_pixels(50, 17, seed)).convert("RGBA"), "PNG", {}),
        "gray_alpha_58x25": (Image.fromarray(_pixels(25, 58, seed)).convert("LA"), "PNG", {}),
        "palette_transparent_33x21": (_palette_with_transparency(33, 21, seed), "PNG", {}),
        "cmyk_45x70": (Image.fromarray(_pixels(70, 45, seed)).convert("CMYK"), "JPEG", {}),
        "gray16_64x48": (Image.fromarray(gray16), "PNG", {}),
        "bilevel_31x31": (Image.fromarray(_pixels(31, 31, seed)).convert("1"), "PNG", {}),
        "exif_rotated_60x20": (rotated, "JPEG", rotated_opts),
        "tiny_5x3": (Image.fromarray(_pixels(3, 5, seed)), "PNG", {}),
        "large_300x200": (Image.fromarray(_pixels(200, 300, seed)), "JPEG", {}),
        "thin_100x7": (Image.fromarray(_pixels(7, 100, seed)), "PNG", {}),
    }


def encode(image: Image.Image, fmt: str, options: dict) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def write_image_folder(root: Path, classes=("ant", "bee", "cat"), train_per_class: int = 5,
                       test_per_class: int = 2) -> Path:
    """An imagefolder (train/<class>/, test/<class>/) whose files cycle through every ``odd_images`` kind."""
    kinds = list(odd_images().items())
    k = 0
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name, (img, fmt, opts) = kinds[k % len(kinds)]
                k += 1
                (root / split / c / f"{i}_{name}.{fmt.lower()}").write_bytes(encode(img, fmt, opts))
    return root


def write_parquet_with_paths_and_structs(root: Path, train: List[str], test: List[str]) -> Path:
    """A folder as another tool writes it: train.parquet / test.parquet (plain pyarrow, no Hugging Face metadata)
    with an ``image`` struct column {bytes, path} (every other row only a path relative to the folder) and a
    ``species`` column of class names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds = list(odd_images().values())
    (root / "images").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, labels in (("train", train), ("test", test)):
        rows = []
        for label in labels:
            img, fmt, opts = kinds[k % len(kinds)]
            data = encode(img, fmt, opts)
            rel = f"images/{split}_{k}.{fmt.lower()}"
            if k % 2:
                (root / rel).write_bytes(data)
                rows.append({"bytes": None, "path": rel})
            else:
                rows.append({"bytes": data, "path": rel})
            k += 1
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        pq.write_table(pa.table({"image": pa.array(rows, image_type), "species": labels}), root / f"{split}.parquet")
    return root
