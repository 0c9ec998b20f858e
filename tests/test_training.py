"""The training recipe end to end, in-process (``main([...])``), on tiny data; resume; two processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import train as train_recipe  # noqa: E402
import evaluate as evaluate_recipe  # noqa: E402

from ncl_hub.config import ConfigError  # noqa: E402

from conftest import TINY  # noqa: E402


def test_recipe_end_to_end_on_tiny_dataset(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "2", "--output_dir", str(out),
                                "--moco.enabled", "true", "--moco.dim", "8", "--moco.queue_size", "16"])
    for rel in ("config.yaml", "run_info.json", "best/model.safetensors", "eval/metrics.json", "eval/summary.md",
                "export/ensemble/model.safetensors", "export/ensemble/README.md", "export/expert/config.json"):
        assert (out / rel).is_file(), rel
    info = json.loads((out / "run_info.json").read_text())
    assert info["class_counts"] == [10, 6, 3, 2]  # 2 per class held out for validation, 1 (= 3 // 2) of the 3
    assert info["class_names"] == ["red", "green", "blue", "gray"]
    metrics = result["metrics"]
    assert set(metrics["splits"]) == {"val", "test"} and metrics["splits"]["test"]["num_samples"] == 12
    assert len(metrics["splits"]["test"]["experts"]) == 3
    assert metrics["selected_expert"] == info["selected_expert"]
    # the export holds no MoCo weights; training checkpoints do
    assert not any(k.startswith("moco.") for k in load_file(out / "export/ensemble/model.safetensors"))
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert any(k.startswith("model.moco.") for k in load_file(ckpt / "model.safetensors"))
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    # evaluation recipe on the export folder
    again = evaluate_recipe.main([str(out / "export" / "expert"), "--split", "test", "--out", str(tmp_path / "ev")])
    assert (tmp_path / "ev" / "metrics.json").is_file()
    sel = metrics["selected_expert"]
    assert again["splits"]["test"]["experts"][0]["top1"] == metrics["splits"]["test"]["experts"][sel]["top1"]


def test_recipe_on_shared_cifar10_slice(cifar10_dir, tmp_path):
    out = tmp_path / "cifar"
    result = train_recipe.main([
        *TINY, "--data.dataset", str(cifar10_dir), "--data.imbalance_factor", "100", "--data.val_per_class", "5",
        "--data.limit_eval", "64", "--epochs", "1", "--max_steps_per_epoch", "3", "--output_dir", str(out),
        "--loss.name", "bsce"])
    info = json.loads((out / "run_info.json").read_text())
    # the benchmark's training set: validation comes from the images the long-tail subsampling left out
    assert info["class_counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert result["metrics"]["splits"]["test"]["num_samples"] == 64
    assert result["history"][0]["step"] == 3


def _weights(path: Path):
    return load_file(path / "model.safetensors")


def test_resume_gives_the_same_weights(tiny_data, tmp_path):
    base = [*TINY, "--data.dataset", str(tiny_data), "--epochs", "2", "--moco.enabled", "true", "--moco.dim", "8",
            "--moco.queue_size", "16", "--save_every_steps", "1", "--keep_last", "20", "--deterministic"]
    full = tmp_path / "full"
    train_recipe.main([*base, "--output_dir", str(full)])
    ckpts = {p.name: p for p in (full / "checkpoints").iterdir()}
    # an interruption mid-epoch (after step 1 of epoch 2) and one at the epoch boundary
    mid = next(n for n in sorted(ckpts) if n.startswith("epoch_0001_step"))
    order = sorted(ckpts, key=lambda n: json.loads((ckpts[n] / "progress.json").read_text())["global_step"])
    for name in (mid, "epoch_0000"):
        # the run folder as a kill right after checkpoint `name` would leave it
        part = tmp_path / f"resumed_{name}"
        shutil.copytree(full, part, ignore=shutil.ignore_patterns("export", "eval", "run_info.json"))
        for later in order[order.index(name) + 1:]:
            shutil.rmtree(part / "checkpoints" / later)
        train_recipe.main([*base, "--output_dir", str(part), "--resume"])
        a, b = _weights(ckpts["epoch_0001"]), _weights(part / "checkpoints" / "epoch_0001")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
        ha = json.loads((ckpts["epoch_0001"] / "progress.json").read_text())["history"][-1]
        hb = json.loads((part / "checkpoints" / "epoch_0001" / "progress.json").read_text())["history"][-1]
        assert ha["train_loss"] == hb["train_loss"]


def test_refuses_a_folder_holding_another_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("epochs: 1\n")
    with pytest.raises(ConfigError, match="holds another run.*--resume.*--overwrite"):
        train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--output_dir", str(out)])


@pytest.mark.slow
def test_two_process_cpu_run_shares_moco_keys(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(REPO / "recipes" / "train.py"), *TINY, "--data.dataset", str(tiny_data), "--epochs", "1",
           "--data.batch_size", "8", "--moco.enabled", "true", "--moco.dim", "8", "--moco.queue_size", "64",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    # computed once over each whole split: the padding that evens out the last batch is dropped
    assert metrics["splits"]["test"]["num_samples"] == 12 and metrics["splits"]["val"]["num_samples"] == 7
    assert proc.stdout.count("wrote ") == 1  # exports written by the main process only
    ckpt = load_file(out / "checkpoints" / "epoch_0000" / "model.safetensors")
    steps = json.loads((out / "checkpoints" / "epoch_0000" / "progress.json").read_text())["global_step"]
    # each step enqueued the keys of both processes (2 x 4 images), not only the local 4
    assert int(ckpt["model.moco.queue_ptr"]) == (steps * 8) % 64
    queue = ckpt["model.moco.queue"][0, : steps * 8]
    assert torch.allclose(queue.norm(dim=-1), torch.ones(steps * 8), atol=1e-5)
    local = queue.view(steps, 2, 4, -1)  # [step, process, image, dim]: the two processes saw other images
    assert not torch.allclose(local[:, 0], local[:, 1])


def test_fine_tune_from_an_export_on_another_class_count(tiny_data, tmp_path):
    src = tmp_path / "src"
    train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "1", "--output_dir", str(src)])
    from conftest import make_tiny_dataset

    other = make_tiny_dataset(tmp_path / "three", per_class=(9, 6, 4), test_per_class=2)
    export = src / "export" / "ensemble"
    out = tmp_path / "ft"
    train_recipe.main([*TINY, "--data.dataset", str(other), "--epochs", "1", "--output_dir", str(out),
                       "--init_from", f"local-dir:{export}", "--init_experts", "[2]", "--model.num_experts", "1",
                       "--freeze_trunks"])
    src_w = load_file(export / "model.safetensors")
    ft_w = load_file(out / "export" / "ensemble" / "model.safetensors")
    trunk = [k for k in ft_w if k.startswith("trunks.0.") and "running" not in k and "num_batches" not in k]
    # the frozen trunk is expert 2 of the source, unchanged; the head is new, for 3 classes
    assert trunk and all(torch.equal(ft_w[k], src_w[k.replace("trunks.0.", "trunks.2.", 1)]) for k in trunk)
    assert ft_w["heads.0.weight"].shape[0] == 3
    assert json.loads((out / "export" / "ensemble" / "config.json").read_text())["num_classes"] == 3


def test_grad_accumulation_keeps_the_step_count_and_tracker_logs(tiny_data, tmp_path):
    runs = {}
    for accum in (1, 2):
        out = tmp_path / f"acc{accum}"
        runs[accum] = train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "1", "--grad_accum",
                                         str(accum), "--output_dir", str(out), "--log_with", "tensorboard"])
    # batch_size is the effective batch: the same optimizer steps per epoch whatever the accumulation
    assert runs[1]["history"][0]["step"] == runs[2]["history"][0]["step"] == 2
    assert list((tmp_path / "acc2" / "logs").rglob("events.out.tfevents.*"))


def test_bf16_autocast_run_trains_with_finite_losses_and_float32_weights(tiny_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    result = train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "1", "--mixed_precision", "bf16",
                                "--output_dir", str(out)])
    first = result["history"][0]
    assert all(torch.isfinite(torch.tensor(first[k])) for k in ("train_loss", "train_nil_all", "train_nbod_all"))
    # autocast changes the compute dtype only: the master weights that are saved stay float32
    weights = load_file(str(out / "best" / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
