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


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_undecodable_image_stops_with_its_index_or_is_counted(mode, tmp_path):
    data = make_tiny_dataset(tmp_path / "corrupt", corrupt_index=5)
    argv = [*TINY, "--data.dataset", str(data), "--data.val_per_class", "0", "--epochs", "1",
            "--data.on_decode_error", mode, "--output_dir", str(tmp_path / "run")]
    if mode == "raise":
        with pytest.raises(Exception, match=r"index 5"):
            train_recipe.main(argv)
    else:
        train_recipe.main(argv)
        info = json.loads((tmp_path / "run" / "run_info.json").read_text())
        assert info["skipped_train_images"] == [5]


# ---------------------------------------------------------------------------------------------- crashes
def _final_weights(run: Path):
    ckpts = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch_") and "step" not in p.name]
    return load_file(max(ckpts) / "model.safetensors")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import ncl_hub.training as T

    calls = {"n": 0}

    class PoisonedLoss(T.NCLLoss):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th optimizer step: epoch 2 of 2 steps per epoch
                out["nbod_hard"] = out["nbod_hard"] * float("nan")
                out["loss"] = out["loss"] + out["nbod_hard"]
            return out

    monkeypatch.setattr(T, "NCLLoss", PoisonedLoss)
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
