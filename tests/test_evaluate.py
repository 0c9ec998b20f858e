"""Evaluation metrics against values worked out by hand on a small fixed table of predictions."""
import json
import math
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ncl_hub.evaluate import (
    evaluate_predictions, format_summary, group_classes, load_metrics, predict, split_metrics, write_report,
)

# K = 2 experts, N = 6 samples, C = 3 classes. Logits are log-probabilities, so softmax gives these rows back.
PROBS_A = [  # expert 0: preds 0, 0, 0, 1, 1, 2 -> correct 1, 1, 0, 1, 0, 1
    [0.70, 0.20, 0.10],
    [0.90, 0.05, 0.05],
    [0.50, 0.30, 0.20],
    [0.10, 0.70, 0.20],
    [0.30, 0.50, 0.20],
    [0.05, 0.05, 0.90],
]
PROBS_B = [  # expert 1: preds 1, 0, 1, 1, 2, 2 -> correct 0, 1, 1, 1, 1, 1
    [0.25, 0.65, 0.10],
    [0.90, 0.05, 0.05],
    [0.25, 0.55, 0.20],
    [0.10, 0.70, 0.20],
    [0.10, 0.35, 0.55],
    [0.05, 0.05, 0.90],
]
LABELS = [0, 0, 1, 1, 2, 2]
COUNTS = [150, 50, 10]  # class 0 many, class 1 medium, class 2 few


def _logits():
    return torch.tensor([PROBS_A, PROBS_B], dtype=torch.float64).log()


def _ensemble_probs():
    """Mean of log-probabilities = normalised geometric mean of the two rows."""
    rows = []
    for a, b in zip(PROBS_A, PROBS_B):
        g = [math.sqrt(x * y) for x, y in zip(a, b)]
        rows.append([v / sum(g) for v in g])
    return rows


def test_group_classes_boundaries():
    groups = group_classes([101, 100, 50, 20, 19, 0])
    assert groups == {"many": [0], "medium": [1, 2, 3], "few": [4, 5]}
    assert group_classes([101, 100, 50, 20, 19], many_threshold=50, few_threshold=50) == {
        "many": [0, 1], "medium": [2], "few": [3, 4]}
    with pytest.raises(ValueError):
        group_classes([1, 2], many_threshold=10, few_threshold=20)


def test_accuracies_by_hand():
    m = split_metrics(_logits(), torch.tensor(LABELS), COUNTS)
    assert m["num_samples"] == 6
    a, b, ens = m["experts"][0], m["experts"][1], m["ensemble"]
    assert a["top1"] == pytest.approx(100 * 4 / 6)
    assert (a["many"], a["medium"], a["few"]) == pytest.approx((100.0, 50.0, 50.0))
    assert b["top1"] == pytest.approx(100 * 5 / 6)
    assert (b["many"], b["medium"], b["few"]) == pytest.approx((50.0, 100.0, 100.0))
    # ensemble rows ~ sqrt(a b): sample 4 gives [sqrt(.03), sqrt(.175), sqrt(.11)] -> class 1, wrong
    assert ens["top1"] == pytest.approx(100 * 5 / 6)
    assert (ens["many"], ens["medium"], ens["few"]) == pytest.approx((100.0, 100.0, 50.0))
    assert m["best_expert"] == 1
    pc = m["per_class_accuracy"]
    assert pc["ensemble"] == pytest.approx([100.0, 100.0, 50.0])
    assert pc["experts"][0] == pytest.approx([100.0, 50.0, 50.0])
    assert pc["experts"][1] == pytest.approx([50.0, 100.0, 100.0])
    assert a["nll"] == pytest.approx(-sum(math.log(PROBS_A[i][y]) for i, y in enumerate(LABELS)) / 6)
    q = _ensemble_probs()
    assert ens["nll"] == pytest.approx(-sum(math.log(q[i][y]) for i, y in enumerate(LABELS)) / 6)
    json.dumps(m)  # plain Python numbers only


def test_ece_by_hand():
    # expert 0, 5 bins: (0.4, 0.6] holds conf .5, .5 with 0 correct; (0.6, 0.8] .7, .7 with 2 correct;
    # (0.8, 1] .9, .9 with 2 correct. ECE = 2/6 * .5 + 2/6 * .3 + 2/6 * .1 = 0.3 -> 30 %
    m = split_metrics(_logits(), torch.tensor(LABELS), COUNTS, num_bins=5)
    assert m["experts"][0]["ece"] == pytest.approx(30.0)
    # with the default 15 bins the same pairs share bins, so the value is unchanged
    assert split_metrics(_logits(), torch.tensor(LABELS), COUNTS)["experts"][0]["ece"] == pytest.approx(30.0)
    # K = 1: the ensemble is the expert
    single = split_metrics(_logits()[:1], torch.tensor(LABELS), COUNTS, num_bins=5)
    assert single["ensemble"]["ece"] == pytest.approx(30.0)
    rel = single["reliability"]
    assert rel["counts"] == [0, 0, 2, 2, 2]
    assert rel["accuracy"][:2] == [None, None]
    assert rel["accuracy"][2:] == pytest.approx([0.0, 1.0, 1.0])
    assert rel["confidence"][2:] == pytest.approx([0.5, 0.7, 0.9])
    # a perfectly confident, always right model has ECE 0
    sure = torch.tensor([[[20.0, 0.0], [0.0, 20.0]]])
    assert split_metrics(sure, torch.tensor([0, 1]), [5, 5])["ensemble"]["ece"] == pytest.approx(0.0, abs=1e-6)


def test_pairwise_kl_known_value():
    p, q = [0.5, 0.5], [0.9, 0.1]
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    logits = torch.tensor([[p, p], [q, q]], dtype=torch.float64).log()  # same pair on both samples
    m = split_metrics(logits, torch.tensor([0, 1]), [200, 200])
    assert m["pairwise_kl"] == pytest.approx((kl_pq + kl_qp) / 2)
    # three experts, two identical: 6 ordered pairs, 4 of them (p vs q) non-zero
    three = torch.tensor([[p], [p], [q]], dtype=torch.float64).log()
    m3 = split_metrics(three, torch.tensor([0]), [200, 200])
    assert m3["pairwise_kl"] == pytest.approx((2 * kl_pq + 2 * kl_qp) / 6)
    assert split_metrics(logits[:1], torch.tensor([0, 1]), [200, 200])["pairwise_kl"] == 0.0
    # a shift of the logits changes nothing: p = softmax(raw logits)
    assert split_metrics(logits + 3.0, torch.tensor([0, 1]), [200, 200])["pairwise_kl"] == pytest.approx(
        m["pairwise_kl"])


def test_hardest_negative_by_hand():
    q = _ensemble_probs()
    expected = [max(q[i][j] for j in range(3) if j != y) for i, y in enumerate(LABELS)]
    # e.g. sample 0: sqrt(.13) / (sqrt(.175) + sqrt(.13) + .1)
    assert expected[0] == pytest.approx(math.sqrt(0.13) / (math.sqrt(0.175) + math.sqrt(0.13) + 0.1))
    m = split_metrics(_logits(), torch.tensor(LABELS), COUNTS, hist_bins=4)
    hn = m["hardest_negative_prob"]
    assert hn["model"] == "ensemble"
    assert hn["mean"] == pytest.approx(sum(expected) / 6)
    ordered = sorted(expected)
    assert hn["median"] == pytest.approx((ordered[2] + ordered[3]) / 2)
    assert hn["bin_edges"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert hn["counts"] == [sum(lo <= v < lo + 0.25 for v in expected) for lo in (0.0, 0.25, 0.5, 0.75)]
    assert sum(hn["counts"]) == 6


def test_empty_groups_give_none():
    # no class has fewer than 20 training images -> "few" is empty
    m = split_metrics(_logits(), torch.tensor(LABELS), [150, 50, 60])
    assert m["ensemble"]["few"] is None and m["experts"][0]["few"] is None
    assert m["ensemble"]["medium"] == pytest.approx(75.0)  # mean of class 1 (100) and class 2 (50)
    # class 2 (the only few class) has no sample in the split
    m = split_metrics(_logits()[:, :4], torch.tensor(LABELS[:4]), COUNTS)
    assert m["ensemble"]["few"] is None
    assert m["per_class_accuracy"]["ensemble"][2] is None
    assert m["experts"][0]["top1"] == pytest.approx(75.0)


def test_split_metrics_rejects_bad_inputs():
    with pytest.raises(ValueError, match="class_counts"):
        split_metrics(_logits(), torch.tensor(LABELS), [1, 2])
    with pytest.raises(ValueError, match="outside"):
        split_metrics(_logits(), torch.tensor([0, 0, 1, 1, 2, 3]), COUNTS)
    with pytest.raises(ValueError, match="K, N, C"):
        split_metrics(_logits()[0], torch.tensor(LABELS), COUNTS)


def test_evaluate_predictions_selects_on_val():
    labels = torch.tensor(LABELS)
    val = (_logits(), labels)  # expert 1 is best here
    test = (_logits()[[1, 0]], labels)  # experts swapped: expert 0 is best on test
    metrics = evaluate_predictions({"val": val, "test": test}, COUNTS)
    assert metrics["selected_expert"] == 1
    assert metrics["splits"]["test"]["best_expert"] == 0
    assert metrics["groups"] == {"many_threshold": 100, "few_threshold": 20, "many": [0], "medium": [1], "few": [2]}
    assert metrics["class_counts"] == COUNTS
    assert evaluate_predictions({"test": test}, COUNTS)["selected_expert"] is None
    assert evaluate_predictions({"val": val, "test": test}, COUNTS, selected_expert=0)["selected_expert"] == 0
    with pytest.raises(ValueError, match="selected_expert"):
        evaluate_predictions({"test": test}, COUNTS, selected_expert=2)


class _FakeNCL(nn.Module):
    """forward_experts(x) [B, D] -> [K, B, C]; records the mode it ran in."""

    num_experts = 2

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3 * self.num_experts)
        self.seen_training = []

    def forward_experts(self, x):
        self.seen_training.append(self.training)
        return self.proj(x).view(x.shape[0], self.num_experts, 3).transpose(0, 1)


def _loader(n=5, batch_size=2):
    g = torch.Generator().manual_seed(0)
    items = [{"pixel_values": torch.randn(4, generator=g), "label": i % 3} for i in range(n)]
    return DataLoader(items, batch_size=batch_size), items


def test_predict_restores_mode_and_matches_direct_forward():
    torch.manual_seed(0)
    model = _FakeNCL().train()
    loader, items = _loader()
    logits, labels = predict(model, loader)
    assert model.training and model.proj.training
    assert model.seen_training == [False, False, False]
    assert logits.shape == (2, 5, 3) and logits.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 0, 1]
    x = torch.stack([item["pixel_values"] for item in items])
    with torch.no_grad():
        torch.testing.assert_close(logits, model.forward_experts(x))
    model.eval()
    predict(model, loader)
    assert not model.training


class _FakeAccelerator:
    """Two processes seen from rank 0: the sampler padded the split to 6 with a copy of sample 0;
    gather_for_metrics drops the copy at the end, along dim 0."""

    device = torch.device("cpu")

    def __init__(self, total):
        self.total, self.seen = total, 0
        self.calls = []

    def unwrap_model(self, model):
        return model.module

    def autocast(self):
        return nullcontext()

    def gather_for_metrics(self, data):
        logits, labels = data
        self.calls.append(tuple(logits.shape))
        keep = min(logits.shape[0], self.total - self.seen)
        self.seen += keep
        return logits[:keep], labels[:keep]


class _Wrapper(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_predict_gathers_samples_first_and_drops_padding():
    model = _FakeNCL()
    wrapped = _Wrapper(model).train()
    loader, items = _loader(n=6, batch_size=3)  # the last item plays the duplicated padding
    accelerator = _FakeAccelerator(total=5)
    logits, labels = predict(wrapped, loader, accelerator)
    assert accelerator.calls == [(3, 2, 3), (3, 2, 3)]  # [B, K, C]: samples on dim 0
    assert logits.shape == (2, 5, 3) and labels.tolist() == [0, 1, 2, 0, 1]
    assert wrapped.training and model.training


def test_predict_with_real_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator(cpu=True)
        model = _FakeNCL()
        loader, _ = _loader()
        prepared_model, prepared_loader = accelerator.prepare(model, loader)
        logits, labels = predict(prepared_model, prepared_loader, accelerator)
        expected, expected_labels = predict(model, loader)
        torch.testing.assert_close(logits, expected)
        assert labels.tolist() == expected_labels.tolist()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _metrics():
    labels = torch.tensor(LABELS)
    return evaluate_predictions({"val": (_logits(), labels), "test": (_logits()[[1, 0]], labels)}, COUNTS)


def test_format_summary_has_the_table():
    text = format_summary(_metrics(), title="CIFAR test run")
    assert text.startswith("# CIFAR test run")
    assert "## val" in text and "## test" in text
    assert "| model | overall | many | medium | few | ECE | NLL |" in text
    assert "| ensemble | 83.33 | 100.00 | 100.00 | 50.00 |" in text
    assert "| expert 0 | 83.33 | 50.00 | 100.00 | 100.00 |" in text  # test split: experts swapped
    assert "| expert 1 (selected) | 66.67 | 100.00 | 50.00 | 50.00 |" in text
    assert "6 samples" in text and "many > 100" in text and "few < 20" in text
    assert "many 1, medium 1, few 1" in text
    assert "Mean pairwise KL" in text


def test_write_report_and_load(tmp_path):
    metrics = _metrics()
    paths = write_report(metrics, tmp_path / "report", title="t")
    assert set(paths) == {"metrics", "summary", "per_class_accuracy", "reliability", "hardest_negative",
                          "prior_shift"}
    for key in ("per_class_accuracy", "reliability", "hardest_negative", "prior_shift"):
        assert paths[key].suffix == ".png" and paths[key].stat().st_size > 1000
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_metrics(paths["metrics"]) == metrics
    assert load_metrics(tmp_path / "report") == metrics
    assert "| ensemble |" in paths["summary"].read_text()
    no_plots = write_report(metrics, tmp_path / "bare", plots=False)
    assert set(no_plots) == {"metrics", "summary"}


def test_write_report_names_the_extra_without_matplotlib(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"ncl-hub\[plots\]"):
        write_report(_metrics(), tmp_path)


def _assert_close_tree(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close_tree(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close_tree(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    else:
        assert a == b


def test_chunked_computation_matches(monkeypatch):
    import ncl_hub.evaluate.shift as shift

    whole = split_metrics(_logits(), torch.tensor(LABELS), COUNTS)
    monkeypatch.setattr(shift, "CHUNK_ELEMENTS", 20)  # (K + 1) * C = 9 -> 2 samples per chunk
    _assert_close_tree(split_metrics(_logits(), torch.tensor(LABELS), COUNTS), whole)
