"""Shifted test priors and prior-adjusted inference: the weighted accuracies against explicitly resampled test sets,
the model's logit adjustment against logits + tau log(pi), its export and reload, the errors, and (end to end)
that deploying a trained model with its training prior helps on a forward long tail and hurts on a backward one."""
import json
import math
import sys
from fractions import Fraction
from math import lcm
from pathlib import Path

import pytest
import timm
import torch

import ncl_hub  # noqa: F401  (registers the NCL models)
from ncl_hub import hub
from ncl_hub.config import ConfigError
from ncl_hub.evaluate import evaluate_predictions, format_summary, split_metrics, write_report
from ncl_hub.priors import (
    TEST_IMBALANCES, check_prior, format_imbalance, load_prior_file, logit_adjustment, long_tailed_prior,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

C = 10
COUNTS = [500, 300, 180, 120, 80, 50, 30, 20, 10, 5]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("ncl_tiny_test", class_counts=COUNTS).eval()


@pytest.fixture(scope="module")
def x32():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _log_prior(prior, tau=1.0):
    p = torch.as_tensor(prior, dtype=torch.float64)
    return (tau * (p / p.sum()).log()).float()


# ---------------------------------------------------------------------------------------------- test priors
def test_long_tailed_prior_follows_the_training_order():
    counts = [10, 100, 1]  # training order: class 1, class 0, class 2
    pi = long_tailed_prior(counts, 25.0)  # weights 1, 25 ** -0.5, 25 ** -1 -> 25 : 5 : 1 over that order
    assert pi.tolist() == pytest.approx([5 / 31, 25 / 31, 1 / 31])
    assert long_tailed_prior(counts, 1 / 25).tolist() == pytest.approx([5 / 31, 1 / 31, 25 / 31])
    assert long_tailed_prior(counts, 1.0).tolist() == pytest.approx([1 / 3] * 3)
    assert long_tailed_prior([7], 50.0).tolist() == [1.0]
    # head / tail = r for every r, whatever C
    for r in TEST_IMBALANCES:
        p = long_tailed_prior(COUNTS, r)
        assert p.sum().item() == pytest.approx(1.0) and p[0] / p[-1] == pytest.approx(r)
    assert [format_imbalance(r) for r in TEST_IMBALANCES] == [
        "50", "25", "10", "5", "2", "1", "1/2", "1/5", "1/10", "1/25", "1/50"]
    with pytest.raises(ValueError, match="test imbalance"):
        long_tailed_prior(counts, 0.0)


def _resample(logits, labels, weights):
    """Repeat each sample of class c so that the class totals are proportional to ``weights`` (exact integers)."""
    n = torch.bincount(labels, minlength=len(weights)).tolist()
    scale = lcm(*[k for k in n if k])
    idx = []
    for i, y in enumerate(labels.tolist()):
        repeats = Fraction(weights[y]) * scale / n[y]
        assert repeats.denominator == 1
        idx += [i] * int(repeats)
    idx = torch.tensor(idx)
    return logits[:, idx], labels[idx]


def _top1(logits, labels, shift=None):
    """Top-1 (%) of the ensemble and of each expert, by hand: argmax of (logits + shift)."""
    z = torch.cat([logits.mean(0, keepdim=True), logits]).double()
    if shift is not None:
        z = z + shift
    return [100.0 * (z[m].argmax(-1) == labels).double().mean().item() for m in range(z.shape[0])]


@pytest.mark.parametrize("counts, labels, integer_weights", [
    # C = 3, classes in training order 1, 0, 2; r = 25 and 1/25 give weights 25 : 5 : 1 and 1 : 5 : 25
    ([10, 100, 1], [0, 0, 1, 1, 1, 2], {25.0: [5, 25, 1], 1 / 25: [5, 1, 25], 1.0: [1, 1, 1]}),
    # C = 4 with class 2 absent from the split: r = 8 gives 8 : 4 : 2 : 1, renormalised over classes 0, 1, 3
    ([40, 30, 20, 10], [0, 1, 1, 3, 3, 3], {8.0: [8, 4, 2, 1], 1 / 8: [1, 2, 4, 8]}),
])
@pytest.mark.parametrize("deployed", [None, "train"])
def test_weighted_accuracy_equals_accuracy_on_a_resampled_test_set(counts, labels, integer_weights, deployed):
    labels = torch.tensor(labels)
    logits = torch.randn(2, len(labels), len(counts), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tau = 0.7
    imbalances = list(integer_weights)
    m = split_metrics(logits, labels, counts, test_imbalances=imbalances, class_prior=deployed, prior_strength=tau)
    exact = [r for r in m["prior_shift"] if r["prior"] in ("raw", "oracle")]
    records = {(r["test_imbalance"], r["model"], r["adjusted"]): r["top1"] for r in exact}
    assert len(exact) == len(imbalances) * 3 * 2
    as_deployed = None if deployed is None else tau * (torch.tensor(counts, dtype=torch.float64) / sum(counts)).log()
    names = ["ensemble", "expert 0", "expert 1"]
    for r, weights in integer_weights.items():
        pi = long_tailed_prior(counts, r)
        assert (pi / pi.max()).tolist() == pytest.approx([w / max(weights) for w in weights])
        big_logits, big_labels = _resample(logits, labels, weights)
        for name, plain, adjusted in zip(names, _top1(big_logits, big_labels, as_deployed),
                                         _top1(big_logits, big_labels, tau * pi.log())):
            assert records[(r, name, False)] == pytest.approx(plain, rel=1e-12, abs=1e-9)
            assert records[(r, name, True)] == pytest.approx(adjusted, rel=1e-12, abs=1e-9)
        # and the resampled split through split_metrics itself (plain logits, or the deployed prior)
        resampled = split_metrics(big_logits, big_labels, counts, test_imbalances=(), class_prior=deployed,
                                  prior_strength=tau)
        assert records[(r, "ensemble", False)] == pytest.approx(resampled["ensemble"]["top1"], rel=1e-12)


def test_deployed_prior_equals_shifting_the_logits():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 50, C, generator=g), torch.arange(50) % C
    tau = 0.5
    deployed = evaluate_predictions({"test": (logits, labels)}, COUNTS, class_prior="train", prior_strength=tau)
    shifted = evaluate_predictions({"test": (logits + _log_prior(COUNTS, tau), labels)}, COUNTS, prior_strength=tau)
    a, b = deployed["splits"]["test"], shifted["splits"]["test"]
    for key in ("top1", "many", "medium", "few", "ece", "nll"):
        assert a["ensemble"][key] == pytest.approx(b["ensemble"][key], rel=1e-6)
        assert a["experts"][2][key] == pytest.approx(b["experts"][2][key], rel=1e-6)
    for ra, rb in zip(a["prior_shift"], b["prior_shift"]):
        if ra["prior"] == "raw":
            assert ra["top1"] == pytest.approx(rb["top1"], rel=1e-9)
    # the adjusted records use the test prior instead: the same as without any deployed prior
    plain = evaluate_predictions({"test": (logits, labels)}, COUNTS, prior_strength=tau)["splits"]["test"]
    assert [r["top1"] for r in a["prior_shift"] if r["prior"] == "oracle"] == pytest.approx(
        [r["top1"] for r in plain["prior_shift"] if r["prior"] == "oracle"], rel=1e-12)
    assert deployed["class_prior"] == "train" and deployed["prior_strength"] == tau
    assert deployed["test_imbalances"] == pytest.approx(list(TEST_IMBALANCES))
    custom = evaluate_predictions({"test": (logits, labels)}, COUNTS, class_prior=[2] * C)
    assert custom["class_prior"] == pytest.approx([0.1] * C)
    assert evaluate_predictions({"test": (logits, labels)}, COUNTS, class_prior="uniform")["class_prior"] is None
    with pytest.raises(ValueError, match="has 3 entries"):
        evaluate_predictions({"test": (logits, labels)}, COUNTS, class_prior=[1, 2, 3])


def test_zero_prior_class_is_never_predicted_and_reports_stay_json():
    logits = torch.zeros(1, 4, 3)
    logits[0, :, 2] = 10.0  # everything says class 2
    labels = torch.tensor([0, 1, 2, 2])
    m = evaluate_predictions({"test": (logits, labels)}, [30, 20, 10], class_prior=[1, 1, 0])
    split = m["splits"]["test"]
    assert split["ensemble"]["top1"] == pytest.approx(25.0)  # class 2 ruled out: argmax falls to class 0
    assert split["ensemble"]["nll"] == math.inf
    assert json.loads(json.dumps(m))["splits"]["test"]["ensemble"]["nll"] == math.inf


def test_summary_report_and_card_show_the_prior_shift_table(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % C
    preds = {"val": (torch.randn(3, 60, C, generator=g), labels), "test": (torch.randn(3, 60, C, generator=g), labels)}
    metrics = evaluate_predictions(preds, COUNTS)
    header = "| model | 50 | 25 | 10 | 5 | 2 | 1 | 1/2 | 1/5 | 1/10 | 1/25 | 1/50 |"
    text = format_summary(metrics)
    selected = metrics["selected_expert"]
    assert "### test: shifted test priors" in text and header in text
    for row in ("| ensemble |", "| ensemble, adjusted |", f"| expert {selected} (selected) |",
                f"| expert {selected} (selected), adjusted |"):
        assert row in text
    assert "Class prior:" not in text
    paths = write_report(metrics, tmp_path / "eval")
    assert paths["prior_shift"].name == "prior_shift.png" and paths["prior_shift"].stat().st_size > 1000
    deployed = evaluate_predictions(preds, COUNTS, class_prior="train")
    assert "Class prior: the training class frequencies (class_prior='train', strength tau = 1)" in format_summary(
        deployed)
    # a class absent from the split: the text says the priors are renormalised
    few = evaluate_predictions({"test": (preds["test"][0][:, :9], labels[:9])}, COUNTS)
    assert "1 of the 10 classes have no image in this split" in format_summary(few)
    # the model card of an export made with these metrics
    model = timm.create_model("ncl_tiny_test")
    folder = hub.save_pretrained(model, tmp_path / "export", metrics=metrics, class_counts=COUNTS)
    card = (folder / "README.md").read_text()
    assert "### Shifted test priors (test split)" in card and header in card
    assert f"| expert {selected} (selected), adjusted |" in card
    assert "- **Class prior:**" not in card


# ---------------------------------------------------------------------------------------------- the model option
def test_adjustment_is_logits_plus_tau_log_prior(tiny, x32):
    prior = torch.rand(C, generator=torch.Generator().manual_seed(2)) + 0.05
    with torch.no_grad():
        raw_experts = tiny.forward_experts(x32)
        raw = tiny(x32)
        adj = _log_prior(prior, 0.8)
        tiny.set_class_prior(prior.tolist(), 0.8)
        try:
            torch.testing.assert_close(tiny.forward_experts(x32), raw_experts + adj)
            torch.testing.assert_close(tiny(x32), raw + adj)
            torch.testing.assert_close(tiny.forward_head(tiny.forward_features(x32)), raw + adj)
            expert = tiny.expert(1).eval()
            assert expert.class_prior == pytest.approx((prior / prior.sum()).tolist())
            torch.testing.assert_close(expert(x32), raw_experts[1] + adj)
            torch.testing.assert_close(expert.forward_experts(x32)[0], raw_experts[1] + adj)
            # the training forward (the loss path) stays raw
            torch.testing.assert_close(tiny.forward_train(x32)["logits"], raw_experts)
            tiny.set_class_prior("train", 1.0)
            torch.testing.assert_close(tiny(x32), raw + _log_prior(COUNTS))
            assert tiny.model_args()["class_prior"] == "train" and tiny.model_args()["prior_strength"] == 1.0
            for off in (dict(prior=None), dict(prior="uniform"), dict(prior="train", strength=0.0)):
                tiny.set_class_prior(**off)
                assert torch.equal(tiny(x32), raw)
            assert "class_prior" not in tiny.set_class_prior(None).model_args()
        finally:
            tiny.set_class_prior(None)


def test_zero_prior_means_never_predicted(tiny, x32):
    model = timm.create_model("ncl_tiny_test").eval()
    with torch.no_grad():
        favourite = model(x32).argmax(-1)
        prior = torch.ones(C)
        prior[favourite] = 0.0
        model.set_class_prior(prior.tolist())
        out = model(x32)
        assert torch.isinf(out[:, favourite]).all() and (out[:, favourite] < 0).all()
        assert not (out.argmax(-1)[:, None] == favourite[None]).any()
        assert torch.isfinite(out.softmax(-1)).all()
        assert torch.isfinite(model.forward_train(x32)["logits"]).all()


@pytest.mark.parametrize("prior, strength, message", [
    ([1.0] * 3, 1.0, "has 3 entries but the model has 10 classes"),
    ([1.0] * 9 + [-0.5], 1.0, r"negative values at classes \[9\]"),
    ([1.0] * 9 + [math.nan], 1.0, "non-finite"),
    ([1.0] * 9 + [math.inf], 1.0, "non-finite"),
    ([0.0] * 10, 1.0, "all zeros"),
    ([[1.0] * 10], 1.0, "flat sequence"),
    ("bogus", 1.0, "unknown class_prior 'bogus'"),
    ([1.0] * 10, -1.0, "prior_strength must be a finite number >= 0"),
    ([1.0] * 10, math.nan, "prior_strength"),
])
def test_bad_priors_raise(prior, strength, message):
    model = timm.create_model("ncl_tiny_test", class_counts=COUNTS)
    with pytest.raises(ValueError, match=message):
        model.set_class_prior(prior, strength)
    assert model.class_prior is None and model.logit_adjustment is None
    with pytest.raises(ValueError, match=message):
        timm.create_model("ncl_tiny_test", class_counts=COUNTS, class_prior=prior, prior_strength=strength)


def test_train_prior_needs_counts_and_a_new_head_forgets_the_prior():
    with pytest.raises(ValueError, match="needs the training class counts"):
        timm.create_model("ncl_tiny_test", class_prior="train")
    with pytest.raises(ValueError, match="class_counts has 4 entries"):
        timm.create_model("ncl_tiny_test", class_counts=[1, 2, 3, 4])
    model = timm.create_model("ncl_tiny_test", class_counts=COUNTS, class_prior="train")
    model.reset_classifier(4)
    assert model.class_prior is None and model.class_counts is None and model.logit_adjustment is None
    assert check_prior([2, 2], 2).tolist() == [0.5, 0.5]
    assert logit_adjustment(None, 1.0) is None


def test_prior_survives_export_and_reload(tmp_path, tiny, x32):
    prior = [float(i + 1) for i in range(C)]
    with torch.no_grad():
        raw, raw_experts = tiny(x32), tiny.forward_experts(x32)
    model = timm.create_model("ncl_tiny_test", class_counts=COUNTS, class_prior=prior, prior_strength=0.5).eval()
    model.load_state_dict(tiny.state_dict())
    folder = hub.save_pretrained(model, tmp_path / "ens", class_names=[f"c{i}" for i in range(C)])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_args"]["class_counts"] == COUNTS and cfg["ncl"]["class_counts"] == COUNTS
    assert cfg["model_args"]["class_prior"] == pytest.approx([p / sum(prior) for p in prior])
    assert cfg["model_args"]["prior_strength"] == 0.5 and cfg["ncl"]["prior_strength"] == 0.5
    card = (folder / "README.md").read_text()
    assert "- **Class prior:** the logits are adjusted to a custom prior over 10 classes" in card
    assert "This export is set for a class prior" in card
    expected = raw + _log_prior(prior, 0.5)
    for loaded in (hub.load_model(folder).eval(), timm.create_model(f"local-dir:{folder}", pretrained=True).eval()):
        assert loaded.class_prior == pytest.approx(cfg["model_args"]["class_prior"]) and loaded.prior_strength == 0.5
        with torch.no_grad():
            torch.testing.assert_close(loaded(x32), expected)
            torch.testing.assert_close(loaded.forward_experts(x32), raw_experts + _log_prior(prior, 0.5))
    # an argument overrides the saved prior; "train" uses the counts stored with the export
    other = timm.create_model(f"local-dir:{folder}", pretrained=True, class_prior="train", prior_strength=2.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x32), raw + _log_prior(COUNTS, 2.0))
    # timm drops None arguments, so class_prior=None keeps the saved prior; "uniform" (or set_class_prior(None))
    # gives the balanced logits back
    assert hub.load_model(folder, class_prior=None).class_prior is not None
    for balanced in (hub.load_model(folder, class_prior="uniform").eval(),
                     hub.load_model(folder).set_class_prior(None).eval()):
        assert balanced.class_prior is None
        with torch.no_grad():
            assert torch.equal(balanced(x32), raw)
    # the single-expert export keeps the prior too
    expert = hub.load_model(hub.save_pretrained(model, tmp_path / "exp", variant="expert", expert_index=2)).eval()
    with torch.no_grad():
        torch.testing.assert_close(expert(x32), raw_experts[2] + _log_prior(prior, 0.5))
    # new heads: the saved counts and prior described the old classes and are dropped
    new = hub.load_model(folder, num_classes=4)
    assert new.class_prior is None and new.class_counts is None and new(x32).shape == (4, 4)
    with pytest.raises(ValueError, match="plain timm model with a class prior"):
        hub.export_timm(model, tmp_path / "plain")
    with pytest.raises(ValueError, match="class_counts differ"):
        hub.save_pretrained(model, tmp_path / "bad", class_counts=list(reversed(COUNTS)))


def test_balanced_export_takes_a_prior_at_load_time(tmp_path, tiny, x32):
    folder = hub.save_pretrained(timm.create_model("ncl_tiny_test").eval(), tmp_path / "ens", class_counts=COUNTS)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert model.class_prior is None and model.class_counts == COUNTS
    adjusted = timm.create_model(f"local-dir:{folder}", pretrained=True, class_prior="train").eval()
    with torch.no_grad():
        torch.testing.assert_close(adjusted(x32), model(x32) + _log_prior(COUNTS))
    # an export written before model_args held the counts: load_model takes them from the ncl section
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["model_args"]["class_counts"]
    (folder / "config.json").write_text(json.dumps(cfg))
    old = hub.load_model(folder, class_prior="train").eval()
    with torch.no_grad():
        torch.testing.assert_close(old(x32), model(x32) + _log_prior(COUNTS))


def test_load_prior_file(tmp_path):
    (tmp_path / "p.json").write_text("[1, 2, 3.5]")
    (tmp_path / "p.txt").write_text("# my traffic\n1, 2\n3.5  # the tail\n")
    (tmp_path / "bad.txt").write_text("1 two 3")
    (tmp_path / "bad.json").write_text('[1, "a"]')
    assert load_prior_file(tmp_path / "p.json") == [1.0, 2.0, 3.5]
    assert load_prior_file(tmp_path / "p.txt") == [1.0, 2.0, 3.5]
    with pytest.raises(ValueError, match="numbers only"):
        load_prior_file(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="list of numbers"):
        load_prior_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        load_prior_file(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------- a trained model
def _brightness_data(counts, generator, size=8):
    """Uniform grey images [N, 3, size, size] whose brightness is 0.2 + 0.2 c + N(0, 0.1) for class c, normalised.

    Neighbouring classes overlap (the Bayes classifier on balanced data is right about 76 % of the time), so the
    class prior matters at test time; on well-separated data (the digits demo after a few epochs, the conftest
    colours) nearly every image is right whatever the prior and no prior can show its effect."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    level = (0.2 + 0.2 * labels + 0.1 * torch.randn(len(labels), generator=generator)).clamp(0, 1)
    return ((level - 0.5) / 0.25).view(-1, 1, 1, 1).expand(-1, 3, size, size).contiguous(), labels


def test_training_prior_helps_on_a_forward_long_tail_and_hurts_on_a_backward_one():
    """NCL (3 tiny experts, the NCL loss) trained on long-tailed data (IF 20), then deployed with
    class_prior="train": better where the test classes are long-tailed like training (r = 50), worse where the
    long tail is reversed (r <= 1/10). About 10 s on 2 CPU cores: 8 px images, 138 SGD steps.

    Checked over training seeds 0-5 while writing this test: the change at r = 50 was +4.3 to +13.1 points and at
    r = 1/10 -4.7 to -33.8 (at r = 10 or 25 it was not always positive: the logits of so short a run only
    approximate the balanced posterior, so the training prior over- or under-corrects there)."""
    from ncl_hub.losses import NCLLoss
    from ncl_hub.models import create_model

    counts, epochs, batch, peak_lr, warmup = [240, 80, 30, 12], 6, 16, 0.05, 20
    g = torch.Generator().manual_seed(0)
    x_train, y_train = _brightness_data(counts, g)
    x_test, y_test = _brightness_data([60] * len(counts), g)
    torch.manual_seed(0)
    model = create_model("resnet8_cifar_tiny", num_classes=len(counts), num_experts=3, class_counts=counts)
    criterion = NCLLoss(counts, validate_targets=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = epochs * math.ceil(len(y_train) / batch)
    batches = (idx for _ in range(epochs) for idx in torch.randperm(len(y_train), generator=g).split(batch))
    model.train()
    for step, idx in enumerate(batches):
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * ((step + 1) / warmup if step < warmup else cosine)
        loss = criterion(model.forward_train(x_train[idx])["logits"], y_train[idx])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model.forward_experts(x_test)
        deployed_logits = model.set_class_prior("train").forward_experts(x_test)
    balanced = split_metrics(logits, y_test, counts)
    deployed = split_metrics(logits, y_test, counts, class_prior="train")
    assert balanced["ensemble"]["top1"] > 60.0  # it learned the task (chance: 25 %)
    before, after = _records(balanced, "ensemble"), _records(deployed, "ensemble")
    assert after[50.0] > before[50.0], (before, after)
    for r in (1 / 10, 1 / 25, 1 / 50):
        assert after[r] < before[r], (r, before, after)
    # the model deployed with the prior predicts what the evaluation computed from the stored logits
    rerun = split_metrics(deployed_logits, y_test, counts)
    assert _records(rerun, "ensemble") == pytest.approx(after)


def _records(split, model, adjusted=False):
    return {r["test_imbalance"]: r["top1"] for r in split["prior_shift"]
            if r["model"] == model and r["prior"] == ("oracle" if adjusted else "raw")}


# ---------------------------------------------------------------------------------------------- the recipes
@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    """One epoch of the training recipe on the conftest dataset (4 classes)."""
    import train as train_recipe
    from conftest import TINY

    out = tmp_path_factory.mktemp("prior_run") / "run"
    result = train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "1", "--output_dir", str(out)])
    return out, result["metrics"]


def test_training_writes_the_prior_shift_and_evaluate_deploys_the_training_prior(trained_run, tmp_path):
    import evaluate as evaluate_recipe

    run, balanced_metrics = trained_run
    assert (run / "eval" / "prior_shift.png").is_file()
    assert "shifted test priors" in (run / "eval" / "summary.md").read_text()
    assert "### Shifted test priors (test split)" in (run / "export" / "ensemble" / "README.md").read_text()
    balanced = balanced_metrics["splits"]["test"]
    assert balanced_metrics["class_prior"] is None
    assert sorted(sum(r["prior"] == kind for r in balanced["prior_shift"]) for kind in ("raw", "oracle")) == [44, 44]
    assert json.loads((run / "eval" / "metrics.json").read_text())["splits"]["test"]["prior_shift"] == \
        balanced["prior_shift"]
    metrics = evaluate_recipe.main([str(run), "--class-prior", "train", "--out", str(tmp_path / "eval")])
    assert metrics["class_prior"] == "train" and metrics["prior_strength"] == 1.0
    assert (tmp_path / "eval" / "prior_shift.png").is_file()
    assert "Class prior: the training class frequencies" in (tmp_path / "eval" / "summary.md").read_text()
    # the adjusted records do not depend on the deployed prior
    deployed = metrics["splits"]["test"]
    assert _records(deployed, "ensemble", True) == pytest.approx(_records(balanced, "ensemble", True))
    with pytest.raises(ConfigError, match="unknown class_prior|does not exist"):
        evaluate_recipe.main([str(run), "--class-prior", str(tmp_path / "missing.json")])


def test_evaluate_recipe_prior_from_file_and_from_the_export(trained_run, tmp_path):
    import yaml

    import evaluate as evaluate_recipe

    run, _ = trained_run
    (tmp_path / "prior.json").write_text("[4, 3, 2, 1]")
    metrics = evaluate_recipe.main([str(run), "--class-prior", str(tmp_path / "prior.json"), "--prior-strength",
                                    "0.5", "--out", str(tmp_path / "file")])
    assert metrics["class_prior"] == pytest.approx([0.4, 0.3, 0.2, 0.1]) and metrics["prior_strength"] == 0.5
    (tmp_path / "short.txt").write_text("1 2 3")
    with pytest.raises(ConfigError, match="has 3 entries but the model has 4 classes"):
        evaluate_recipe.main([str(run), "--class-prior", str(tmp_path / "short.txt")])
    with pytest.raises(ConfigError, match="'prior_strength' expects float, got 'strong'"):
        evaluate_recipe.main([str(run), "--prior-strength", "strong"])
    # an export that carries the prior is evaluated with it, the same as --class-prior on the plain export
    model = hub.load_model(run / "export" / "ensemble").set_class_prior("train")
    config = yaml.safe_load((run / "export" / "ensemble" / "training_config.yaml").read_text())
    folder = hub.save_pretrained(model, tmp_path / "deployed", config=config)
    from_export = evaluate_recipe.main([str(folder), "--out", str(tmp_path / "export_eval")])
    from_flag = evaluate_recipe.main([str(run / "export" / "ensemble"), "--class-prior", "train",
                                      "--out", str(tmp_path / "flag_eval")])
    assert from_export["class_prior"] == "train"
    assert from_export["splits"]["test"]["prior_shift"] == from_flag["splits"]["test"]["prior_shift"]
    assert from_export["splits"]["test"]["ensemble"] == from_flag["splits"]["test"]["ensemble"]


def test_open_run_gives_the_raw_predictions_that_evaluate_scores(trained_run, tmp_path):
    import yaml
    from accelerate import Accelerator

    from ncl_hub.apps.evaluate import open_run, predict_splits

    run, metrics = trained_run
    saved = open_run(run, ["val", "test"])
    assert len(saved.class_counts) == saved.model.num_classes and sum(saved.class_counts) == len(saved.data.train)
    z, y = predict_splits(saved, ["test"], Accelerator())["test"]
    assert z.shape[:2] == (saved.model.num_experts, len(saved.data.test))
    top1 = 100 * (z.double().mean(0).argmax(1) == y).double().mean().item()
    assert top1 == pytest.approx(metrics["splits"]["test"]["ensemble"]["top1"])
    # a model saved with a deployment prior still predicts raw logits (the prior stays on the model)
    model = hub.load_model(run / "export" / "ensemble").set_class_prior("train")
    config = yaml.safe_load((run / "export" / "ensemble" / "training_config.yaml").read_text())
    deployed = open_run(hub.save_pretrained(model, tmp_path / "deployed", config=config), ["test"])
    assert deployed.model.class_prior == "train"
    z_deployed, y_deployed = predict_splits(deployed, ["test"], Accelerator())["test"]
    assert torch.equal(y_deployed, y) and torch.allclose(z_deployed, z, atol=1e-5)
    with pytest.raises(ConfigError, match="split 'holdout' is not available; have"):
        predict_splits(saved, ["holdout"], Accelerator())
