"""The benchmark's protocol: benchmark-exact training sets, where validation comes from, schedules counted in
steps and fractions of the run, numbers on the command line, and the optional ramp of the NCL terms."""
import datasets
import numpy as np
import pytest
import torch

from ncl_hub.config import WARMUP_STEPS_DEFAULT, ConfigError, RunConfig, load_config, parse_args
from ncl_hub.data import class_counts, long_tailed_counts, long_tailed_split, make_long_tailed
from ncl_hub.losses import NCLLoss, ncl_loss
from ncl_hub.training import build_data, describe_schedule, lr_factor, needed_warmup_steps

from conftest import REPO, TINY, make_tiny_dataset
from test_data import _label_dataset


# ---------------------------------------------------------------------------------------------- validation source
def test_long_tailed_split_is_the_benchmark_plus_discarded_images():
    ds = _label_dataset([500] * 10)
    train, val, val_counts = long_tailed_split(ds, 100, val_per_class=20, seed=0)
    # the training set is exactly make_long_tailed's (the benchmark), nothing taken from it
    assert list(train["idx"]) == list(make_long_tailed(ds, 100, seed=0)["idx"])
    assert class_counts(train, 10) == long_tailed_counts(500, 10, 100)
    # validation: disjoint, balanced where the discarded pool allows, none for the head class (keeps all 500)
    assert not set(train["idx"]) & set(val["idx"])
    assert val_counts == class_counts(val, 10) == [0] + [20] * 9
    # only images the subsampling discarded: every other seed-0 choice of the class is in train
    kept_or_val = set(train["idx"]) | set(val["idx"])
    assert len(kept_or_val) == len(train) + len(val)


def test_long_tailed_split_small_pools_and_head_size():
    ds = _label_dataset([100, 100, 100])
    train, val, val_counts = long_tailed_split(ds, 10, val_per_class=40, n_max=80, seed=3)
    assert class_counts(train, 3) == long_tailed_counts(80, 3, 10) == [80, 25, 8]
    assert val_counts == [20, 40, 40]  # the head class has only 100 - 80 = 20 left over
    assert not set(train["idx"]) & set(val["idx"])
    _, val0, counts0 = long_tailed_split(ds, 10, val_per_class=0)
    assert len(val0) == 0 and counts0 == [0, 0, 0]
    with pytest.raises(ValueError, match="val_per_class"):
        long_tailed_split(ds, 10, val_per_class=-1)


def test_cifar10_lt_trains_on_the_benchmark_set(cifar10_dir):
    cfg = parse_args(["--data.dataset", str(cifar10_dir), "--data.imbalance_factor", "100",
                      "--data.val_per_class", "30"])
    data = build_data(cfg)
    assert len(data.train) == 12406 and data.class_counts == long_tailed_counts(5000, 10, 100)
    assert class_counts(data.val, 10) == [0] + [30] * 9
    assert any("left out" in n for n in data.notes) and any("airplane 0" in n for n in data.notes)
    # the same images whatever the training seed (the choice follows data.lt_seed)
    other = build_data(parse_args(["--data.dataset", str(cifar10_dir), "--data.imbalance_factor", "100",
                                   "--data.val_per_class", "30", "--seed", "7"]))
    assert other.train._indices.to_pylist() == data.train._indices.to_pylist()
    assert other.val._indices.to_pylist() == data.val._indices.to_pylist()


def test_own_validation_split_is_used(tmp_path):
    import shutil

    src = make_tiny_dataset(tmp_path / "src")
    dd = datasets.load_from_disk(str(src))
    dd["validation"] = dd["test"]
    shutil.rmtree(src)
    dd.save_to_disk(str(tmp_path / "with_val"))
    data = build_data(parse_args(["--data.dataset", str(tmp_path / "with_val")]))
    assert len(data.val) == 12 and data.class_counts == [12, 8, 5, 3]  # nothing held out of training
    assert "own validation split" in data.notes[0]


def test_holdout_only_when_nothing_else_exists(tiny_data):
    data = build_data(parse_args(["--data.dataset", str(tiny_data), "--data.val_per_class", "2"]))
    assert data.class_counts == [10, 6, 3, 2]
    assert "held out" in data.notes[0] and "red 2/12" in data.notes[0] and "gray 1/3" in data.notes[0]


def test_head_size_needs_a_long_tail_to_make(tiny_data):
    with pytest.raises(ConfigError, match="lt_head_size"):
        build_data(parse_args(["--data.dataset", str(tiny_data), "--data.lt_head_size", "5"]))


# ---------------------------------------------------------------------------------------------- schedule
def _cfg(*argv):
    return parse_args(list(argv))


def test_milestones_are_fractions_of_the_run():
    cfg = _cfg("--config", str(REPO / "recipes/configs/cifar10_lt_if100.yaml"), "--epochs", "20")
    steps = 100
    lr = [lr_factor(s, steps, cfg) for s in range(20 * steps)]
    assert lr[1600 - 1] == pytest.approx(1.0) and lr[1600] == pytest.approx(0.1)  # epoch 16 of 20
    assert lr[1800 - 1] == pytest.approx(0.1) and lr[1800] == pytest.approx(0.01)  # epoch 18
    cfg400 = _cfg("--config", str(REPO / "recipes/configs/cifar10_lt_if100.yaml"))
    assert lr_factor(320 * steps, steps, cfg400) == pytest.approx(0.1)
    assert lr_factor(320 * steps - 1, steps, cfg400) == pytest.approx(1.0)


def test_warmup_counts_optimizer_steps_whatever_the_epoch_length():
    cfg = _cfg("--optim.warmup_steps", "500", "--optim.schedule", "multistep", "--epochs", "50")
    for steps_per_epoch in (10, 1000):
        assert lr_factor(0, steps_per_epoch, cfg) == pytest.approx(1 / 500)
        assert lr_factor(249, steps_per_epoch, cfg) == pytest.approx(0.5)
        assert lr_factor(499, steps_per_epoch, cfg) == pytest.approx(1.0)
    cos = _cfg("--optim.warmup_steps", "100", "--epochs", "3")
    assert lr_factor(100, 100, cos) == pytest.approx(1.0) and lr_factor(299, 100, cos) < 1e-3


def test_schedule_is_described_and_short_warmups_warned():
    lines = describe_schedule(30, _cfg("--optim.warmup_steps", "30", "--epochs", "30"))
    text = "\n".join(lines)
    assert "30 epochs x 30 optimizer steps = 900 steps" in text and "warm-up 30 steps (1.0 epochs)" in text
    assert f"shorter than the {WARMUP_STEPS_DEFAULT} NCL needs at lr 0.1" in text and "collapse" in text
    # the need follows the rate: half the rate, half the steps
    half = "\n".join(describe_schedule(30, _cfg("--optim.warmup_steps", str(WARMUP_STEPS_DEFAULT // 2),
                                                 "--optim.lr", "0.05")))
    assert "collapse" not in half
    assert needed_warmup_steps(0.2) == 2 * WARMUP_STEPS_DEFAULT
    ok = describe_schedule(100, _cfg("--epochs", "20", "--optim.schedule", "multistep"))
    assert not any(line.startswith("warning") for line in ok)
    assert "x0.1 at step 1600 (epoch 16.0), step 1800 (epoch 18.0)" in ok[0]
    # plain losses do not need NCL's warm-up; a warm-up longer than half the run is always warned
    assert not any("collapse" in x for x in describe_schedule(30, _cfg("--optim.warmup_steps", "30",
                                                                        "--loss.name", "bsce")))
    assert any("more than half" in x for x in describe_schedule(10, _cfg("--optim.warmup_steps", "200",
                                                                          "--epochs", "30")))


def test_schedule_options_are_checked_before_training(tiny_data, tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "recipes"))
    import train as train_recipe

    for bad, match in ((["--optim.milestones", "[320, 360]"], "fractions of the run"),
                       (["--optim.warmup_steps", "-1"], "warmup_steps"),
                       (["--loss.ramp_steps", "-5"], "ramp_steps"),
                       (["--loss.hard_weight", "-1"], "hard_weight")):
        with pytest.raises(ConfigError, match=match):
            train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--output_dir", str(tmp_path / "x"), *bad])
        assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="replaced by optim.warmup_steps"):
        parse_args(["--optim.warmup_epochs", "5"])


def test_shipped_configs_warm_up_as_long_as_ncl_needs_at_their_rate():
    for path in sorted((REPO / "recipes" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.optim.warmup_steps >= needed_warmup_steps(cfg.optim.lr), path
        if cfg.optim.lr >= 0.1:
            assert cfg.optim.warmup_steps >= WARMUP_STEPS_DEFAULT, path
    assert RunConfig().optim.warmup_steps == WARMUP_STEPS_DEFAULT == needed_warmup_steps(RunConfig().optim.lr)


# ---------------------------------------------------------------------------------------------- numbers
def test_numbers_without_a_dot_parse_as_numbers(tmp_path):
    cfg = parse_args(["--optim.lr", "5e-2", "--optim.weight_decay", "2e-4", "--optim.milestones", "[5e-1, 9e-1]"])
    assert cfg.optim.lr == 0.05 and cfg.optim.weight_decay == 2e-4 and cfg.optim.milestones == [0.5, 0.9]
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-1\n  weight_decay: 5e-4\n  min_lr: 1E-6\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.min_lr) == (0.1, 5e-4, 1e-6)
    with pytest.raises(ConfigError, match="'optim.lr' expects float"):
        parse_args(["--optim.lr", "1e-x"])


# ---------------------------------------------------------------------------------------------- ramp
def _paper_and_option(seed, **option):
    """Inputs, the paper's loss and the loss with ``option``, whose unscaled terms must be the paper's."""
    torch.manual_seed(seed)
    logits, target, counts = torch.randn(3, 8, 6), torch.randint(6, (8,)), [30, 20, 10, 5, 3, 2]
    full = ncl_loss(logits, target, counts, anchor=1)
    changed = ncl_loss(logits, target, counts, anchor=1, **option)
    for k in ("nil_all", "nil_hard", "nbod_all", "nbod_hard"):
        assert torch.equal(full[k], changed[k])
    return (logits, target, counts), full, changed


def test_ramp_scales_the_hard_and_distillation_terms_only():
    (logits, target, counts), full, half = _paper_and_option(0, ramp=0.5)
    extra = full["nil_hard"] + 0.6 * (full["nbod_all"] + full["nbod_hard"])
    assert torch.allclose(half["loss"], full["nil_all"] + 0.5 * extra)
    crit = NCLLoss(counts, anchor=1, ramp_steps=4)
    factors = []
    for step in range(6):
        crit.set_step(step)
        factors.append(float(crit.ramp))
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    crit.set_step(1)
    assert torch.allclose(crit(logits, target)["loss"], full["nil_all"] + 0.5 * extra)
    assert torch.allclose(NCLLoss(counts, anchor=1)(logits, target)["loss"], full["loss"])


def test_hard_weight_scales_the_hard_category_terms_only():
    (logits, target, counts), full, none = _paper_and_option(1, hard_weight=0.0)
    # without Hard Category Mining: NIL and NBOD on all classes only
    assert torch.allclose(none["loss"], full["nil_all"] + 0.6 * full["nbod_all"])
    crit = NCLLoss(counts, anchor=1, hard_weight=0.5)
    expected = full["nil_all"] + 0.5 * full["nil_hard"] + 0.6 * (full["nbod_all"] + 0.5 * full["nbod_hard"])
    assert torch.allclose(crit(logits, target)["loss"], expected)
    with pytest.raises(ValueError, match="hard_weight"):
        NCLLoss(counts, hard_weight=-1.0)


def test_ramp_follows_the_optimizer_steps_in_training(tiny_data, tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "recipes"))
    import train as train_recipe

    result = train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "2", "--loss.ramp_steps", "100",
                                "--output_dir", str(tmp_path / "r")])
    assert np.isfinite(result["history"][-1]["train_loss"])
    # the logged loss is the ramped total: below nil_all + nil_hard early in the ramp
    h = result["history"][0]
    assert h["train_loss"] < h["train_nil_all"] + h["train_nil_hard"]
