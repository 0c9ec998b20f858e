"""Crashes and resume, atomic saves, bad input caught before training, safe loading, several processes,
and properties of the losses over random inputs."""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from conftest import TINY, make_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import train as train_recipe  # noqa: E402

import ncl_hub  # noqa: E402
from ncl_hub.config import ConfigError  # noqa: E402
from ncl_hub.losses import ncl_loss  # noqa: E402
from ncl_hub.training import NonFiniteLossError  # noqa: E402


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


# ---------------------------------------------------------------------------------------------- bad input
def _dataset_without(tmp_path, column):
    names = ("pixels", "label") if column == "image" else ("image", "target_id")
    return make_tiny_dataset(tmp_path / f"no_{column}", columns=names)


def _dataset_with_negative_label(tmp_path):
    path = tmp_path / "neg"
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b"", "path": None}] * 3, "label": [0, -1, 1]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return path


def _mismatched_export(tmp_path):
    model = ncl_hub.create_model("resnet20_cifar", num_classes=4)
    return "local-dir:" + str(ncl_hub.hub.save_pretrained(model, tmp_path / "r20_export"))


CATALOGUE = [  # id, extra argv (a callable taking tmp_path for data-dependent ones), expected message
    ("unknown-backbone", ["--model.backbone", "resnet_50"], r"unknown timm backbone 'resnet_50'.*resnet50"),
    ("unknown-key", ["--optim.lrr", "0.1"], r"unknown config key 'optim.lrr'.*optim.lr"),
    ("wrong-type", ["--epochs", "three"], r"'epochs' expects int, got 'three'"),
    ("missing-dataset", ["--data.dataset", "/nonexistent/ncl/data"], r"/nonexistent/ncl/data.*(not exist|not found)"),
    ("no-image-column", lambda t: ["--data.dataset", str(_dataset_without(t, "image"))], r"image.*column.*pixels"),
    ("no-label-column", lambda t: ["--data.dataset", str(_dataset_without(t, "label"))], r"label.*column.*target_id"),
    ("negative-label", lambda t: ["--data.dataset", str(_dataset_with_negative_label(t))], r"-1"),
    ("empty-class-after-lt", lambda t: ["--data.dataset", str(make_tiny_dataset(t / "balanced", per_class=(6,) * 4)),
                                        "--data.imbalance_factor", "1000"], r"class.*(0 images|no training images)"),
    ("imbalance-below-1", ["--data.imbalance_factor", "0.5"], r"imbalance_factor must be >= 1"),
    ("hard-ratio", ["--loss.hard_ratio", "1.5"], r"hard_ratio must be in \(0, 1\)"),
    ("no-experts", ["--model.num_experts", "0"], r"num_experts must be >= 1"),
    ("batch-below-processes", ["--data.batch_size", "0"], r"batch_size 0 is smaller than processes"),
    ("init-from-mismatch", lambda t: ["--init_from", _mismatched_export(t)],
     r"backbone .resnet20_cifar., but this model.s backbone is .resnet8_cifar_tiny."),
    ("bad-variant", ["--loss.variant", "released"], r"variant must be paper or official"),
    ("bad-precision", ["--mixed_precision", "fp8"], r"mixed_precision must be no, fp16 or bf16"),
]


@pytest.mark.parametrize("case,extra,message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_refused_before_training(case, extra, message, tiny_data, tmp_path):
    extra = extra(tmp_path) if callable(extra) else extra
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--output_dir", str(out), *extra])
    assert not (out / "checkpoints").exists()  # nothing trained, nothing written over


def test_bad_input_exits_with_a_one_line_error(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "train.py"), "--model.backbone", "resnet_50",
                           "--output_dir", str(tmp_path / "x")], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model: unknown timm backbone 'resnet_50'")


def test_output_folder_holding_another_run_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "epoch_0000").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds another run"):
        train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--output_dir", str(out)])
    assert (out / "checkpoints" / "epoch_0000").is_dir()


@pytest.mark.parametrize("skip", [False, True])
def test_undecodable_image_stops_the_run_before_training_or_is_left_out(skip, tmp_path):
    data = make_tiny_dataset(tmp_path / "corrupt", corrupt_index=5)
    argv = [*TINY, "--data.dataset", str(data), "--data.val_per_class", "0", "--epochs", "1",
            "--data.skip_unreadable", str(skip).lower(), "--output_dir", str(tmp_path / "run")]
    if not skip:
        with pytest.raises(ConfigError, match=r"split 'train', row 5 .*: not an image: a text file"):
            train_recipe.main(argv)
        assert not (tmp_path / "run" / "checkpoints").exists()
    else:
        train_recipe.main(argv)
        info = json.loads((tmp_path / "run" / "run_info.json").read_text())
        assert [r["row"] for r in info["unreadable_images"]["train"]] == [5] and info["skipped_train_images"] == []
        assert sum(info["class_counts"]) == 27  # 28 training images, one left out


# ---------------------------------------------------------------------------------------------- crashes
def _final_weights(run: Path):
    ckpts = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch_") and "step" not in p.name]
    return load_file(max(ckpts) / "model.safetensors")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import ncl_hub.losses as L
    import ncl_hub.training.build as B  # build_criterion takes NCLLoss from here

    calls = {"n": 0}

    class PoisonedLoss(L.NCLLoss):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th optimizer step: epoch 2 of 2 steps per epoch
                out["nbod_hard"] = out["nbod_hard"] * float("nan")
                out["loss"] = out["loss"] + out["nbod_hard"]
            return out

    monkeypatch.setattr(B, "NCLLoss", PoisonedLoss)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 4: loss=nan, nbod_hard=nan"):
        train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "3", "--output_dir", str(out)])
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["epoch_0000"]
    weights = load_file(out / "checkpoints" / "epoch_0000" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_resume_skips_an_incomplete_checkpoint(tiny_data, tmp_path, caplog):
    base = [*TINY, "--data.dataset", str(tiny_data), "--epochs", "2", "--deterministic"]
    full = tmp_path / "full"
    train_recipe.main([*base, "--output_dir", str(full)])
    part = tmp_path / "part"
    shutil.copytree(full, part, ignore=shutil.ignore_patterns("export", "eval", "run_info.json"))
    shutil.rmtree(part / "checkpoints" / "epoch_0001")
    # a kill during the epoch-2 checkpoint write leaves a temporary folder with partial files
    broken = part / "checkpoints" / ".tmp-epoch_0001"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with caplog.at_level("WARNING"):
        train_recipe.main([*base, "--output_dir", str(part), "--resume"])
    assert "skipping incomplete checkpoint" in caplog.text
    a, b = _final_weights(full), _final_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    base = [*TINY, "--data.dataset", str(tiny_data), "--epochs", "3", "--deterministic", "--save_every_steps", "1",
            "--keep_last", "2", "--moco.enabled", "true", "--moco.dim", "8", "--moco.queue_size", "16"]
    full = tmp_path / "full"
    train_recipe.main([*base, "--output_dir", str(full)])
    total_steps = json.loads((full / "run_info.json").read_text())["history"][-1]["step"]
    killed = tmp_path / "killed"
    target = random.Random(os.getpid()).randint(1, total_steps - 1)
    # same thread count as this process: the float reductions, hence the bits, depend on it
    env = dict(_env(), OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, str(REPO / "recipes" / "train.py"), *base, "--output_dir", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            done = [json.loads((p / "progress.json").read_text())["global_step"]
                    for p in (killed / "checkpoints").glob("epoch_*") if (p / "progress.json").is_file()] \
                if (killed / "checkpoints").is_dir() else []
            if done and max(done) >= target:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(random.Random(target).uniform(0, 0.3))  # anywhere in the next step or checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    train_recipe.main([*base, "--output_dir", str(killed), "--resume"])
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the same selection too: same best epoch and expert, same test metrics
    fa, fb = (json.loads((r / "run_info.json").read_text()) for r in (full, killed))
    assert (fa["best_epoch"], fa["selected_expert"]) == (fb["best_epoch"], fb["selected_expert"])
    ma, mb = (json.loads((r / "eval" / "metrics.json").read_text()) for r in (full, killed))
    assert ma["splits"]["test"] == mb["splits"]["test"]


# ---------------------------------------------------------------------------------------------- safe loading
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_pickles_are_not_executed(tiny_data, tmp_path):
    run = tmp_path / "run"
    train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "1", "--output_dir", str(run)])
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "epoch_0000"
    with open(ckpt / "optimizer.bin", "wb") as f:
        pickle.dump({"state": _Payload(str(marker))}, f)
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl"):
        train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "2", "--output_dir", str(run),
                           "--resume"])
    assert not marker.exists()


def test_export_pickles_are_not_executed(tmp_path):
    model = ncl_hub.create_model("resnet8_cifar_tiny", num_classes=4, num_experts=1)
    folder = ncl_hub.hub.save_pretrained(model, tmp_path / "export")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"trunks.0.conv1.weight": _Payload(str(marker))}, f)
    with pytest.raises(Exception):
        ncl_hub.hub.load_model(f"local-dir:{folder}")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_killing_one_of_two_processes_stops_the_other(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           str(REPO / "recipes" / "train.py"), *TINY, "--data.dataset", str(tiny_data), "--epochs", "500",
           "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "checkpoints" / "epoch_0000").is_dir():
            time.sleep(0.1)
        assert proc.poll() is None
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        t = time.time()
        output, _ = proc.communicate(timeout=120)
        assert time.time() - t < 120
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "exitcode  : -9" in output or "Signal 9" in output or "SIGKILL" in output, output[-2000:]


# ---------------------------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(
    K=st.integers(1, 4), B=st.integers(1, 6), C=st.integers(2, 12),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    variant=st.sampled_from(["paper", "official"]),
    seed=st.integers(0, 2**16),
)
def test_loss_properties(K, B, C, scale, dtype, variant, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(K, B, C, generator=g) * scale).to(dtype)
    target = torch.randint(C, (B,), generator=g)
    counts = torch.randint(1, 1000, (C,), generator=g).tolist()
    anchor = int(torch.randint(K, (1,), generator=g))
    out = ncl_loss(logits, target, counts, anchor=anchor, variant=variant)
    for key, value in out.items():
        assert torch.isfinite(value), key
        assert value >= 0, (key, value)
    if variant == "paper":  # the experts are interchangeable once the anchor follows its expert
        perm = torch.randperm(K, generator=g)
        permuted = ncl_loss(logits[perm], target, counts, anchor=int((perm == anchor).nonzero()), variant=variant)
        for key in out:
            assert torch.allclose(out[key], permuted[key], rtol=1e-4, atol=1e-4 * max(1.0, scale / 100)), key


# ---------------------------------------------------------------------------------------------- real-world data
# Data and files as people have them: every case trains (and exports) correctly, or ends in one clear error before
# any training, with nothing written over.
SHORT = ["--epochs", "1", "--max_steps_per_epoch", "2", "--data.val_per_class", "0"]


def _image_bytes(seed=0):
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _parquet_folder(path, train_labels, test_labels=None, *, label_type=None, images=None):
    """train.parquet (and test.parquet) as plain pyarrow writes them: encoded images and a ``label`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if labels is None:
            continue
        column = images(split, len(labels)) if images else pa.array([_image_bytes(i) for i in range(len(labels))])
        pq.write_table(pa.table({"image": column, "label": pa.array(labels, label_type)}), path / f"{split}.parquet")
    return path


def _saved_dataset(path, train_labels, test_labels):
    """A DatasetDict.save_to_disk folder whose splits were built separately (their label columns may differ)."""
    dd = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [{"bytes": _image_bytes(i), "path": None} for i in range(len(labels))], "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value(
            "string" if isinstance(labels[0], str) else "int64")}))
        for split, labels in (("train", train_labels), ("test", test_labels))})
    dd.save_to_disk(str(path))
    return path


def _paths_column(split, n):
    import pyarrow as pa

    return pa.array([f"images/{split}_{i}.png" for i in range(n)])  # none of these files exists


DATA_CASES = [  # id, dataset builder (tmp_path -> folder), expected message
    ("int-labels-with-a-gap", lambda t: _parquet_folder(t / "d", [0, 1, 3] * 4, [0, 1, 3]),
     r"run up to 3, but 1 value\(s\) below that have no image in any split: \[2\]"),
    ("one-based-int-labels", lambda t: _parquet_folder(t / "d", [1, 2, 3] * 4, [1, 2, 3]), r"\[0\].*1-based"),
    ("string-test-label-unseen-in-train", lambda t: _parquet_folder(t / "d", ["ant", "bee"] * 6, ["ant", "wasp"]),
     r"split 'test' .* 1 class\(es\) that the training split has no image of: \['wasp'\]"),
    ("float-labels", lambda t: _parquet_folder(t / "d", [0.0, 1.0] * 6), r"holds Value\('float64'\).*ClassLabel"),
    ("missing-labels", lambda t: _parquet_folder(t / "d", [0, None, 1] * 4, label_type=None),
     r"4 missing label\(s\)"),
    ("string-and-int-labels-mixed", lambda t: _saved_dataset(t / "d", [0, 1] * 6, ["ant", "bee"]),
     r"split 'test' .* string labels but the training split has class indices"),
    ("missing-image-files", lambda t: _parquet_folder(t / "d", [0, 1] * 6, images=_paths_column),
     r"12 image file\(s\) listed .* do not exist, e.g. row 0: 'images/train_0.png' \(looked for .*d/images/"),
    ("not-an-image-column", lambda t: _parquet_folder(t / "d", [0, 1] * 6, images=lambda s, n: list(range(n))),
     r"holds Value\('int64'\), not images"),
]


@pytest.mark.parametrize("case,build,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_real_world_data_is_refused_before_training(case, build, message, tmp_path):
    data = build(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train_recipe.main([*TINY, *SHORT, "--data.dataset", str(data), "--output_dir", str(out)])
    assert not out.exists()  # nothing trained, nothing written


def test_mixed_image_folder_trains_and_exports(tmp_path):
    """Grayscale, RGBA, LA, palette with transparency, CMYK, 16-bit, 1-bit, EXIF-rotated, 5x3 to 300x200 images in one
    folder: the CIFAR policy used to stop in the first epoch with 'Required crop size (32, 32) is larger than input
    image size (58, 25)'."""
    from real_world import write_image_folder

    data = write_image_folder(tmp_path / "photos")
    out = tmp_path / "run"
    train_recipe.main([*TINY, *SHORT, "--data.dataset", str(data), "--data.augment", "cifar", "--moco.enabled", "true",
                       "--moco.dim", "8", "--moco.queue_size", "16", "--output_dir", str(out)])
    config = json.loads((out / "export" / "ensemble" / "config.json").read_text())
    assert config["label_names"] == ["ant", "bee", "cat"]
    assert json.loads((out / "run_info.json").read_text())["skipped_train_images"] == []


def test_string_labels_structs_and_relative_paths_train(tmp_path, capsys):
    """Parquet written by another tool: {bytes, path} structs (half of them only a path relative to the folder),
    class names as strings, a test split without one class; the report names that class."""
    from real_world import write_parquet_with_paths_and_structs

    data = write_parquet_with_paths_and_structs(tmp_path / "plants", train=["rose", "fern", "oak", "fern"] * 3,
                                                test=["oak", "rose", "rose"])
    out = tmp_path / "run"
    train_recipe.main([*TINY, *SHORT, "--data.dataset", str(data), "--data.label_column", "species",
                       "--output_dir", str(out)])
    for variant in ("ensemble", "expert"):  # names sorted as class_encode_column sorts them
        assert json.loads((out / "export" / variant / "config.json").read_text())["label_names"] == [
            "fern", "oak", "rose"]
        assert "- **Classes:** 3: fern, oak, rose" in (out / "export" / variant / "README.md").read_text()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["splits"]["test"]["classes_without_images"] == ["fern"]
    printed = capsys.readouterr().out
    assert "test: 1 of 3 classes have no test images: fern" in printed


# ---------------------------------------------------------------------------------------------- damaged files
@pytest.fixture(scope="module")
def good_export(tmp_path_factory):
    model = ncl_hub.create_model("resnet8_cifar_tiny", num_classes=4, num_experts=2)
    return ncl_hub.hub.save_pretrained(model, tmp_path_factory.mktemp("exports") / "good", class_names=list("abcd"))


def _truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _replace_weights(folder, **model_kwargs):
    from safetensors.torch import save_file

    other = ncl_hub.create_model("resnet8_cifar_tiny", **{"num_classes": 4, "num_experts": 2, **model_kwargs})
    save_file(other.inference_state_dict(), str(folder / "model.safetensors"))


def _drop_trunk_key(folder):
    from safetensors.torch import save_file

    weights = load_file(folder / "model.safetensors")
    del weights["trunks.1.conv1.weight"]
    save_file(weights, str(folder / "model.safetensors"))


def _drop_backbone(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["model_args"]["backbone"]
    (folder / "config.json").write_text(json.dumps(config))


def _torch_zip(folder):
    torch.save({"w": torch.zeros(2)}, folder / "model.safetensors")


DAMAGED = [  # id, damage(folder), loaders that must fail, expected message
    ("truncated-weights", lambda f: _truncate(f / "model.safetensors"), ("timm", "load_model", "init_from"),
     r"model\.safetensors is truncated: \d+ bytes of the \d+ its header describes.*export the model again"),
    ("empty-weights", lambda f: (f / "model.safetensors").write_bytes(b""), ("timm", "load_model", "init_from"),
     r"model\.safetensors is empty \(0 bytes\)"),
    ("weights-are-a-torch-zip", _torch_zip, ("timm", "load_model", "init_from"),
     r"model\.safetensors is not a safetensors file: it is a zip archive \(the torch.save format\)"),
    ("weights-are-a-git-lfs-pointer", lambda f: (f / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n"), ("timm", "load_model"),
     r"model\.safetensors is not a safetensors file: it is a Git LFS pointer.*git lfs pull"),
    ("weights-miss-a-trunk-tensor", _drop_trunk_key, ("timm", "load_model", "init_from"),
     r"model\.safetensors does not match this model.*1 trunk tensors missing \(e\.g\. \['trunks\.1\.conv1\.weight'\]"),
    ("weights-of-another-class-count", lambda f: _replace_weights(f, num_classes=5), ("timm", "load_model"),
     r"the weights in .*model\.safetensors do not fit the model its config describes.*size mismatch.*heads"),
    ("weights-of-another-width", lambda f: _replace_weights(f, in_chans=1), ("timm", "load_model", "init_from"),
     r"model\.safetensors does not match this model.*shape mismatches"),
    ("truncated-config", lambda f: _truncate(f / "config.json", 0.6), ("load_model", "init_from"),
     r"config\.json is not valid JSON: .* \(the text stops mid-way: truncated\?\)"),
    ("config-is-an-html-page", lambda f: (f / "config.json").write_text("<html><body>502 Bad Gateway</body></html>"),
     ("load_model", "init_from"), r"config\.json is not JSON: it is an HTML or XML page"),
    ("config-misses-the-backbone", _drop_backbone, ("load_model", "init_from"),
     r"config\.json has architecture 'ncl' but no model_args\.backbone"),
]

LOADERS = {
    "timm": lambda folder: __import__("timm").create_model(f"local-dir:{folder}", pretrained=True),
    "load_model": lambda folder: ncl_hub.hub.load_model(f"local-dir:{folder}"),
    "init_from": lambda folder: ncl_hub.hub.init_from(
        ncl_hub.create_model("resnet8_cifar_tiny", num_classes=4, num_experts=2), folder),
}


@pytest.mark.parametrize("case,damage,loaders,message", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_export_is_named_by_every_loader(case, damage, loaders, message, good_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(good_export, folder)
    damage(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name in loaders:
        with pytest.raises((ncl_hub.hub.DamagedFileError, ncl_hub.hub.CheckpointMismatchError), match=message) as err:
            LOADERS[name](folder)
        assert str(folder) in str(err.value), name  # the file is named by its path
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def _fake_hub_cache(cache, repo_id, folder, damage):
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/) holding a copy of an export, ``damage``d:
    what an interrupted download leaves behind."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    damage(repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_partial_download_in_the_hub_cache_is_named_offline(good_export, tmp_path):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest: the tests never reach the network
    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "ncl-test/partial", good_export, lambda f: _truncate(f / "model.safetensors"))
    damaged = (snapshot / "model.safetensors").read_bytes()
    for load in (lambda: ncl_hub.hub.load_model("hf-hub:ncl-test/partial", cache_dir=cache),
                 lambda: __import__("timm").create_model("hf-hub:ncl-test/partial", pretrained=True, cache_dir=cache)):
        with pytest.raises(ncl_hub.hub.DamagedFileError,
                           match=r"(?s)model\.safetensors is truncated.*Hub cache's copy of 'model\.safetensors' from "
                                 r"repo 'ncl-test/partial': delete .*model\.safetensors.*offline"):
            load()
    assert (snapshot / "model.safetensors").read_bytes() == damaged  # named, not deleted behind the user's back
    _truncate(snapshot / "config.json", 0.5)
    with pytest.raises(ncl_hub.hub.DamagedFileError, match=r"config\.json is not valid JSON.*delete"):
        ncl_hub.hub.load_model("hf-hub:ncl-test/partial", cache_dir=cache)


def test_partial_download_is_fetched_again_once_online(good_export, tmp_path, monkeypatch):
    import huggingface_hub

    from ncl_hub import files

    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "ncl-test/partial", good_export, lambda f: _truncate(f / "model.safetensors"))
    calls = []

    def download(repo, filename, *, force_download=False, **kwargs):
        calls.append((repo, filename, force_download))
        if force_download:  # the fresh copy replaces the damaged one, as huggingface_hub does
            shutil.copy2(good_export / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(files, "_is_offline", lambda: False)
    weights = files.fetch_hub_file("ncl-test/partial", "model.safetensors", files.read_weights)
    assert calls == [("ncl-test/partial", "model.safetensors", False), ("ncl-test/partial", "model.safetensors", True)]
    assert weights.keys() == load_file(good_export / "model.safetensors").keys()
    # still damaged after a fresh download: the file in the repo itself is damaged
    monkeypatch.setattr(shutil, "copy2", lambda src, dst: None)
    _truncate(snapshot / "model.safetensors")
    with pytest.raises(files.DamagedFileError, match=r"downloaded afresh from Hub repo 'ncl-test/partial' and still "
                                                     r"damaged.*upload it again"):
        files.fetch_hub_file("ncl-test/partial", "model.safetensors", files.read_weights)


@pytest.mark.parametrize("damage,message", [
    (lambda f: _truncate(f / "model.safetensors"), r"model: .*model\.safetensors is truncated"),
    (lambda f: (f / "config.json").write_text('{"architecture": "ncl", '), r"model: .*config\.json is not valid JSON"),
], ids=["truncated-weights", "truncated-config"])
def test_damaged_init_from_export_is_refused_before_training(damage, message, good_export, tiny_data, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(good_export, folder)
    damage(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train_recipe.main([*TINY, *SHORT, "--data.dataset", str(tiny_data), "--init_from", f"local-dir:{folder}",
                           "--output_dir", str(out)])
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    train_recipe.main([*TINY, *SHORT, "--data.dataset", str(tiny_data), "--output_dir", str(run)])
    return run


def _snapshot(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage,extra,message", [
    (lambda c: _truncate(c / "model.safetensors"), [],
     r"--resume: .*checkpoints/epoch_0000/model\.safetensors is truncated.*Delete the checkpoint folder"),
    (lambda c: _truncate(c / "optimizer.bin"), [],
     r"--resume: .*epoch_0000/optimizer\.bin is a truncated torch\.save zip archive"),
    (lambda c: _truncate(c / "progress.json"), [], r"progress\.json is not valid JSON"),
    (lambda c: None, ["--model.num_experts", "2"],
     r"--resume: checkpoint .*epoch_0000 does not fit this run .*resume with the run's own config\.yaml"),
], ids=["truncated-weights", "truncated-optimizer", "truncated-progress", "other-model"])
def test_damaged_or_foreign_checkpoint_is_refused_before_resuming(damage, extra, message, finished_run, tiny_data,
                                                                  tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "checkpoints" / "epoch_0000")
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=message):
        train_recipe.main([*TINY, *SHORT, "--epochs", "2", "--data.dataset", str(tiny_data), "--output_dir", str(run),
                           "--resume", *extra])
    assert _snapshot(run) == before  # config.yaml, checkpoints, best/ and export/ all untouched


def test_evaluate_recipe_names_a_damaged_export(good_export, tmp_path):
    import evaluate as evaluate_recipe

    folder = tmp_path / "export"
    shutil.copytree(good_export, folder)
    _truncate(folder / "model.safetensors")
    with pytest.raises(ConfigError, match=r"cannot load the model in .*export: .*model\.safetensors is truncated"):
        evaluate_recipe.main([str(folder)])
    (folder / "config.json").write_text("")
    with pytest.raises(ConfigError, match=r"config\.json is empty"):
        evaluate_recipe.main([str(folder)])
    assert not any(p.name.startswith("eval") for p in folder.iterdir())
