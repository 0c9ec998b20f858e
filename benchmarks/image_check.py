"""What the image check before training costs (``ncl_hub.data.checks``): every image of a split decoded once (JPEG at
1/8 scale), in parallel, then read back from its record on the next run.

    python benchmarks/image_check.py                          # CIFAR-10 (60,000 PNGs) and 48 synthetic 12 MP JPEGs
    python benchmarks/image_check.py --workers 2 --photos 96  # more photos, two worker processes

Prints, per dataset: images, seconds for the first check (cold), seconds for the second (the record read back), and
for the photos the time of one full-size decode against the check's reduced decode.
"""
import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ncl_hub.data import load_image_dataset  # noqa: E402
from ncl_hub.data.checks import check_split  # noqa: E402


def _photos(root: Path, n: int, size=(4000, 3000)) -> Path:
    """``n`` 12-megapixel JPEGs (smooth gradients with noise, quality 90, about 2-4 MB each) in class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 255 // (w + h))], -1).astype(np.int16)
    for i in range(n):
        noise = rng.integers(-20, 21, (h, w, 3), dtype=np.int16)
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        folder = root / "train" / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"photo_{i:03d}.jpg", quality=90)
    return root


def _time_checks(dataset, name: str, workers: int, cache: Path):
    t0 = time.perf_counter()
    bad = check_split(dataset, name, num_workers=workers, cache_dir=cache)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_split(dataset, name, num_workers=workers, cache_dir=cache)
    warm = time.perf_counter() - t0
    return cold, warm, len(bad)


def _decode_times(path: Path):
    from ncl_hub.data.checks import open_image
    from PIL import Image

    data = path.read_bytes()
    t0 = time.perf_counter()
    Image.open(io.BytesIO(data)).load()
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    open_image(data, min_side=1)
    reduced = time.perf_counter() - t0
    return full, reduced


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar10", default=str(REPO.parent / "shared" / "data" / "cifar10"),
                   help="CIFAR-10 parquet folder")
    p.add_argument("--photos", type=int, default=48, help="synthetic 12 MP JPEGs to check")
    p.add_argument("--workers", type=int, default=0, help="worker processes of the check (data.num_workers)")
    args = p.parse_args(argv)
    print(f"{os.cpu_count()} CPUs, check workers {args.workers}")
    print("| dataset | images | first check (s) | images/s | second run: record read back (s) | unreadable |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (Path(args.cifar10) / "train.parquet").is_file():
            dd = load_image_dataset(args.cifar10)
            for split in ("train", "test"):
                cold, warm, bad = _time_checks(dd[split], split, args.workers, tmp / "cache")
                n = len(dd[split])
                print(f"| CIFAR-10 {split} (PNG, 32 x 32) | {n} | {cold:.1f} | {n / cold:.0f} | {warm:.2f} "
                      f"| {bad} |")
        photos = _photos(tmp / "photos", args.photos)
        dd = load_image_dataset(str(photos), test_split=None)
        cold, warm, bad = _time_checks(dd["train"], "train", args.workers, tmp / "cache")
        n = len(dd["train"])
        print(f"| photos (JPEG, 4000 x 3000) | {n} | {cold:.1f} | {n / cold:.1f} | {warm:.2f} | {bad} |")
        full, reduced = _decode_times(next((photos / "train" / "class_0").glob("*.jpg")))
        print(f"\none 12 MP JPEG: full decode {full * 1000:.0f} ms, the check's 1/8-scale decode "
              f"{reduced * 1000:.0f} ms")


if __name__ == "__main__":
    main()
