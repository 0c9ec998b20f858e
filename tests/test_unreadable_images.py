"""Damaged images never end a run: every image is checked before training, bad ones are named all at once (or left
out with --data.skip_unreadable), the check is cached by content, an image that turns bad later is skipped and
named; and every error that ends a recipe is one line."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY, make_tiny_dataset

sys.path.insert(0, str(REPO / "recipes"))

import train as train_recipe  # noqa: E402
from ncl_hub.config import ConfigError  # noqa: E402
from ncl_hub.data import checks  # noqa: E402

HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def _jpeg(seed: int, size=(40, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


BAD = {"truncated.jpg": _jpeg(99)[:300], "empty.jpg": b"", "page.jpg": HTML}
REASONS = {"truncated.jpg": "truncated", "empty.jpg": "empty", "page.jpg": "HTML"}


def _image_folder(root: Path) -> Path:
    """train/ (3 classes, 8 good JPEGs each, plus the three bad files in class b) and test/ (3 per class)."""
    for split, n in (("train", 8), ("test", 3)):
        for c in ("a", "b", "c"):
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i}.jpg").write_bytes(_jpeg(hash((split, c, i)) % 1000))
    for name, data in BAD.items():
        (root / "train" / "b" / name).write_bytes(data)
    return root


def _parquet(root: Path) -> Path:
    """train.parquet / test.parquet with the images as bytes; rows 3, 7 and 11 of train are the bad ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, n in (("train", 24), ("test", 9)):
        rows = [{"bytes": _jpeg(i), "path": None} for i in range(n)]
        if split == "train":
            for row, data in zip((3, 7, 11), BAD.values()):
                rows[row] = {"bytes": data, "path": None}
        pq.write_table(pa.table({"image": pa.array(rows, image_type), "label": [i % 3 for i in range(n)]}),
                       root / f"{split}.parquet")
    return root


def _argv(data: Path, out: Path, *extra: str):
    return [*TINY, "--data.dataset", str(data), "--data.val_per_class", "0", "--epochs", "1",
            "--data.check_cache", str(out.parent / "checks"), "--output_dir", str(out), *extra]


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_bad_images_stop_the_run_before_training_all_named(kind, tmp_path):
    data = _image_folder(tmp_path / "folder") if kind == "folder" else _parquet(tmp_path / "pq")
    with pytest.raises(checks.UnreadableImagesError) as info:
        train_recipe.main(_argv(data, tmp_path / "run"))
    message = str(info.value)
    assert message.startswith("3 image(s) cannot be read")
    for name, reason in REASONS.items():
        assert reason in message
        if kind == "folder":
            assert str(data / "train" / "b" / name) in message
    if kind == "parquet":
        assert all(f"split 'train', row {row}" in message for row in (3, 7, 11))
    assert "--data.skip_unreadable true" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_skip_mode_trains_without_them_and_reports_them(kind, tmp_path, capsys):
    data = _image_folder(tmp_path / "folder") if kind == "folder" else _parquet(tmp_path / "pq")
    out = tmp_path / "run"
    train_recipe.main(_argv(data, out, "--data.skip_unreadable", "true"))
    log = capsys.readouterr().out
    assert "3 unreadable image(s) left out" in log
    info = json.loads((out / "run_info.json").read_text())
    assert len(info["unreadable_images"]["train"]) == 3
    assert {r["reason"].split(":")[0] for r in info["unreadable_images"]["train"]} == {
        "truncated", "empty", "not an image"}
    assert sum(info["class_counts"]) == (24 if kind == "folder" else 21)
    card = (out / "export" / "ensemble" / "README.md").read_text()
    assert "3 unreadable training image(s) were left out" in card
    # a second run reuses the cached check: the record is read back, nothing is decoded again
    train_recipe.main(_argv(data, tmp_path / "run2", "--data.skip_unreadable", "true"))
    assert "checked before (record read back)" in capsys.readouterr().out


def test_the_check_is_keyed_by_content(tmp_path):
    from ncl_hub.data import load_image_dataset

    data = _image_folder(tmp_path / "folder")
    train = load_image_dataset(str(data))["train"]
    first = checks.check_split(train, "train", cache_dir=tmp_path / "c")
    assert sorted(Path(b.where).name for b in first) == sorted(BAD)
    (data / "train" / "b" / "truncated.jpg").write_bytes(_jpeg(5))  # repaired: another key, checked again
    again = checks.check_split(load_image_dataset(str(data))["train"], "train", cache_dir=tmp_path / "c")
    assert sorted(Path(b.where).name for b in again) == ["empty.jpg", "page.jpg"]
    assert len(list((tmp_path / "c").glob("train-*.json"))) == 2


def test_image_that_turns_bad_after_the_check_is_skipped_and_named(tmp_path, monkeypatch, capsys):
    data = make_tiny_dataset(tmp_path / "corrupt", corrupt_index=5)
    monkeypatch.setattr(checks, "image_problem", lambda data, path: None)  # the check saw a good file
    out = tmp_path / "run"
    train_recipe.main(_argv(data, out))
    info = json.loads((out / "run_info.json").read_text())
    assert info["skipped_train_images"] == [5]
    assert "split 'train', row 5" in capsys.readouterr().out


def test_decompression_bomb_is_refused_with_its_reason(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses more than twice this many pixels
    problem = checks.image_problem(_jpeg(1, size=(40, 40)), None)
    assert problem.startswith("a decompression bomb")


def test_large_jpeg_is_decoded_at_reduced_size():
    big = _jpeg(3, size=(1600, 1200))
    image = checks.open_image(big, min_side=100)
    assert min(image.size) >= 100 and image.size[0] <= 400  # 1/4 scale or less, never below the side asked for
    assert checks.open_image(big).size == (1600, 1200)


# ---------------------------------------------------------------------------------------------- one-line errors
import evaluate as evaluate_recipe  # noqa: E402
import publish as publish_recipe  # noqa: E402

RECIPES = {"train": train_recipe, "evaluate": evaluate_recipe, "publish": publish_recipe}


def _one_line_error(recipe: str, args, monkeypatch, capsys, *fragments: str) -> str:
    """Run a recipe as from the command line (its own sys.argv, no argv given) and return its one error line."""
    monkeypatch.setattr(sys, "argv", [f"recipes/{recipe}.py", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        RECIPES[recipe].main()
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("finished") / "run"
    train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "1", "--output_dir", str(out)])
    return out


def test_every_error_that_ends_a_recipe_is_one_line(finished_run, tiny_data, tmp_path, monkeypatch, capsys):
    data = _image_folder(tmp_path / "folder")
    tiny = [*TINY, "--data.dataset", tiny_data]
    cases = [
        ("train", _argv(data, tmp_path / "a"), ("cannot be read", "page.jpg", "skip_unreadable")),
        ("train", [*tiny, "--epochs", "2", "--optim.lr", "1e30", "--output_dir", tmp_path / "b"],
         ("non-finite loss", "optimizer step", "checkpoint")),
        ("train", [*tiny, "--data.batch_size", "x"], ("data.batch_size",)),
        ("train", [*tiny, "--model.num_experts", "2", "--epochs", "2", "--resume", "latest", "--output_dir",
                   finished_run], ("--resume", "does not fit")),
        ("evaluate", [tmp_path / "nothing"], ("neither a training output folder",)),
        ("evaluate", [finished_run, "--split", "train", "--data.dataset", data], ("cannot be read", "page.jpg")),
        ("evaluate", [finished_run, "--class-prior", tmp_path / "none.json"], ("class prior file",)),
        ("publish", [tmp_path / "nothing", "--repo-id", "org/name", "--dry-run"], ("not a training output folder",)),
        ("publish", [tmp_path, "--repo-id", "org/name", "--dry-run"], ("no model in",)),
    ]
    for recipe, args, fragments in cases:
        _one_line_error(recipe, args, monkeypatch, capsys, *fragments)


def test_an_unexpected_error_is_one_line_that_points_to_debug(monkeypatch, capsys):
    def broken(cfg, argv=None):
        raise KeyError("a bug")

    monkeypatch.setattr(train_recipe, "train", broken)
    line = _one_line_error("train", [], monkeypatch, capsys, "KeyError", "--debug")
    assert "unexpected" in line


def test_the_command_line_error_and_debug_traceback_in_a_real_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run = [sys.executable, str(REPO / "recipes" / "evaluate.py"), str(tmp_path / "nothing")]
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    proc = subprocess.run([*run, "--debug"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = subprocess.run(run, capture_output=True, text=True, env=dict(env, NCL_HUB_DEBUG="1"), timeout=600)
    assert "Traceback" in proc.stderr


def test_help_documents_debug(capsys):
    with pytest.raises(SystemExit):
        train_recipe.main(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_config_errors_in_process_still_raise(tiny_data):
    with pytest.raises(ConfigError):
        train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--data.batch_size", "x"])
