"""Deploying where the class mix is unknown: calibration fitted at the end of training and carried by exports, the
prior estimated from unlabelled images in one call, the estimated rows of the shifted-prior evaluation, and
recipes/predict.py."""
import csv
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY

sys.path.insert(0, str(REPO / "recipes"))

import predict as predict_recipe  # noqa: E402
import train as train_recipe  # noqa: E402
from ncl_hub.calibration import Calibration  # noqa: E402
from ncl_hub.config import ConfigError  # noqa: E402
from ncl_hub.evaluate import evaluate_predictions  # noqa: E402
from ncl_hub.hub import load_model, save_pretrained  # noqa: E402

COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "gray": (110, 110, 110)}


def _image(color, seed: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color)[None, None] + rng.integers(-25, 26, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _color_data(root, per_class=(40, 24, 14, 8), test=10):
    """An image folder of four colour classes, long-tailed train split, balanced test split."""
    for split, counts in (("train", per_class), ("test", (test,) * 4)):
        for (name, color), n in zip(COLORS.items(), counts):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / name / f"{i}.png").write_bytes(_image(color, hash((split, name, i)) % 10_000))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    data = _color_data(root / "colors")
    out = root / "run"
    train_recipe.main([*TINY, "--data.dataset", str(data), "--data.val_per_class", "4", "--epochs", "6",
                       "--optim.lr", "0.05", "--output_dir", str(out)])
    return out


def test_training_fits_the_calibration_and_exports_carry_it(trained):
    info = json.loads((trained / "run_info.json").read_text())
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    calibration = metrics["calibration"]
    assert calibration["fit_split"] == "val" and len(calibration["experts"]) == 3
    assert calibration["ensemble"]["nll_after"] <= calibration["ensemble"]["nll_before"] + 1e-9
    test = metrics["splits"]["test"]
    assert set(test["calibration"]["ensemble"]) >= {"nll", "nll_calibrated", "ece", "ece_calibrated"}
    kinds = {r["prior"] for r in test["prior_shift"]}
    assert kinds == {"raw", "oracle", "estimated"}
    estimated = [r for r in test["prior_shift"] if r["prior"] == "estimated"]
    assert all(0 <= r["prior_l1"] <= 2 and r["draws"] == 5 for r in estimated)
    for variant in ("ensemble", "expert"):
        model = load_model(trained / "export" / variant)
        assert model.calibration is not None
        Calibration.from_dict(model.calibration["ensemble"], model.num_classes)
    expert = load_model(trained / "export" / "expert")
    assert expert.calibration["ensemble"] == calibration["experts"][info["selected_expert"]]
    summary = (trained / "eval" / "summary.md").read_text()
    assert "### test: calibration" in summary and "estimated prior" in summary
    card = (trained / "export" / "ensemble" / "README.md").read_text()
    assert "**Calibration:** temperature scaling (logits / T) fitted on the val split (16 images)" in card


def _colour_batch(model, counts):
    from ncl_hub.data.transforms import eval_transform

    tf = eval_transform(model.pretrained_cfg)
    images = [tf(Image.open(io.BytesIO(_image(color, 50_000 + i))).convert("RGB"))
              for (name, color), n in zip(COLORS.items(), counts) for i in range(n)]
    return torch.stack(images)


def test_fit_class_prior_in_one_call_survives_export_and_reload(trained, tmp_path):
    model = load_model(trained / "export" / "ensemble")
    names = model.class_names
    skewed = _colour_batch(model, [4 if name != "blue" else 40 for name in COLORS])  # mostly blue
    estimate = model.fit_class_prior(skewed, batch_size=16)
    prior = torch.tensor(model.class_prior)
    assert prior[names.index("blue")] > 0.5 and abs(float(prior.sum()) - 1) < 1e-6
    assert model.prior_estimate["num_samples"] == 52 and estimate.iterations >= 1
    with torch.no_grad():
        probs = model.predict_proba(skewed[:3])
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    save_pretrained(model, tmp_path / "deployed", variant="ensemble")
    again = load_model(tmp_path / "deployed")
    assert again.class_prior == pytest.approx(model.class_prior)
    assert again.calibration == model.calibration and again.prior_estimate == model.prior_estimate
    card = (tmp_path / "deployed" / "README.md").read_text()
    assert "estimated from 52 unlabelled images" in card
    model.set_class_prior("uniform")
    assert model.prior_estimate is None  # a prior set by hand is not an estimate


def _folder(root, counts, bad=True):
    for (name, color), n in zip(COLORS.items(), counts):
        for i in range(n):
            (root / "sub").mkdir(parents=True, exist_ok=True)
            (root / "sub" / f"{name}_{i}.jpg").write_bytes(_image(color, 70_000 + i, fmt="JPEG"))
    if bad:
        jpeg = _image(COLORS["red"], 1, fmt="JPEG")
        (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
        (root / "notes.txt.png").write_bytes(b"these are my notes, not an image\n")
        (root / "gray.png").write_bytes(_image(COLORS["gray"], 2, mode="L"))
    return root


def test_predict_recipe_writes_rows_for_good_images_and_names_the_bad(trained, tmp_path, capsys):
    images = _folder(tmp_path / "images", (2, 2, 2, 2))
    out = tmp_path / "predictions.csv"
    result = predict_recipe.main([str(trained), str(images), "--output", str(out), "--top-k", "2",
                                  "--num-workers", "0"])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 9 and result["predicted"] == 9  # 8 colour images + the grayscale PNG
    assert set(rows[0]) == {"path", "class_1", "prob_1", "class_2", "prob_2"}
    assert any(r["path"].endswith("gray.png") for r in rows)
    assert all(r["class_1"] in COLORS and float(r["prob_1"]) >= float(r["prob_2"]) for r in rows)
    log = capsys.readouterr().out
    assert "2 image(s) could not be read and were skipped" in log
    assert "truncated.jpg: truncated" in log and "notes.txt.png: not an image: a text file" in log


def test_predict_estimate_raises_the_share_of_the_class_the_images_are_skewed_to(trained, tmp_path, capsys):
    balanced = _folder(tmp_path / "balanced", (6, 6, 6, 6), bad=False)
    skewed = _folder(tmp_path / "skewed", (2, 2, 20, 2), bad=False)
    shares = {}
    for name, folder in (("balanced", balanced), ("skewed", skewed)):
        out = tmp_path / f"{name}.csv"
        result = predict_recipe.main([str(trained / "export" / "ensemble"), str(folder), "--output", str(out),
                                      "--class-prior", "estimate", "--num-workers", "0"])
        record = json.loads((tmp_path / f"{name}.prior.json").read_text())
        assert result["prior_file"] == str(tmp_path / f"{name}.prior.json")
        shares[name] = record["prior"][record["class_names"].index("blue")]
    assert shares["skewed"] > shares["balanced"] + 0.2
    log = capsys.readouterr().out
    assert "| class | estimated | training |" in log
    # the JSON is a prior that --class-prior FILE.json and create_model(class_prior=...) accept
    out = tmp_path / "again.csv"
    predict_recipe.main([str(trained), str(skewed), "--output", str(out), "--class-prior",
                         str(tmp_path / "skewed.prior.json"), "--num-workers", "0"])
    model = load_model(trained / "export" / "ensemble", class_prior=str(tmp_path / "skewed.prior.json"))
    assert model.class_prior[model.class_names.index("blue")] == pytest.approx(shares["skewed"])
    with pytest.raises(ValueError, match="for the classes"):
        record = json.loads((tmp_path / "skewed.prior.json").read_text())
        model.set_class_prior(dict(record, class_names=list(reversed(record["class_names"]))))


def test_predict_refuses_bad_options_before_reading_images(trained, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        predict_recipe.main([str(trained), str(tmp_path / "missing"), "--output", str(tmp_path / "p.csv")])
    with pytest.raises(ConfigError, match="class prior file"):
        predict_recipe.main([str(trained), str(tmp_path), "--class-prior", str(tmp_path / "none.json")])


def test_estimated_rows_follow_the_known_prior_on_synthetic_logits():
    """Calibrated synthetic logits: the estimated-prior adjustment gains over raw where the prior is skewed, and
    stays with the oracle; its L1 error is small."""
    g = torch.Generator().manual_seed(0)
    num_classes, per_class = 5, 400
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    means = torch.eye(num_classes) * 2.0
    x = means[labels] + torch.randn(len(labels), num_classes, generator=g)
    logits = torch.log_softmax(2.0 * x, -1)  # a balanced-prior posterior of this Gaussian model
    counts = [1000, 400, 150, 60, 20]
    metrics = evaluate_predictions({"test": (logits[None], labels)}, counts, selected_expert=0,
                                   test_imbalances=(50.0, 1.0, 1 / 50))
    rows = {(r["test_imbalance"], r["prior"]): r for r in metrics["splits"]["test"]["prior_shift"]
            if r["model"] == "ensemble"}
    for r in (50.0, 1 / 50):
        est = rows[(r, "estimated")]
        assert est["top1"] > est["raw_top1"] + 3 and est["top1"] > est["oracle_top1"] - 2 and est["prior_l1"] < 0.15
    assert abs(rows[(1.0, "estimated")]["top1"] - rows[(1.0, "estimated")]["raw_top1"]) < 2
