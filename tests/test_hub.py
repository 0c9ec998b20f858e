"""Hub export/import: round trips through local folders and a real local Hub server (olah), model cards,
fine-tuning from an export, publish (dry run and upload), error messages, and token hygiene."""
import copy
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from huggingface_hub import ModelCard, hf_hub_download, snapshot_download

import ncl_hub  # noqa: F401  (registers the NCL models)
from ncl_hub import hub
from ncl_hub.models import CosineClassifier, NCLModel, WeightsUnavailableError
from ncl_hub.models.factory import CheckpointMismatchError

from hub_server import LocalHub, UploadServer, free_port, grep_tree, olah_cli, point_hub_to, subprocess_env

REPO = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_nclFAKEtoken0123456789abcdefXYZ"
C = 10


# ---------------------------------------------------------------------------------------------- fixtures
def _numbers(top1, few=None):
    return {"top1": top1, "many": top1 + 10.0, "medium": top1 - 5.0, "few": few, "ece": 0.04, "nll": 1.3}


def make_metrics(selected=1, num_experts=3, class_counts=(500, 300, 180, 120, 80, 50, 30, 20, 10, 5)):
    def split(shift):
        experts = [_numbers(50.0 + shift + (5.0 if k == selected else k)) for k in range(num_experts)]
        return {"num_samples": 100, "ensemble": _numbers(61.0 + shift, few=12.5), "experts": experts,
                "best_expert": selected, "pairwise_kl": 0.1, "hardest_negative_prob": {}, "per_class_accuracy": {}}

    return {
        "splits": {"test": split(0.0), "val": split(1.0)},
        "class_counts": list(class_counts),
        "groups": {"many_threshold": 100, "few_threshold": 20,
                   "many": [c for c, n in enumerate(class_counts) if n >= 100],
                   "medium": [c for c, n in enumerate(class_counts) if 20 < n < 100],
                   "few": [c for c, n in enumerate(class_counts) if n <= 20]},
        "selected_expert": selected,
    }


def make_run_info(selected=1, command="python recipes/train.py --config cifar10_lt.yaml --train.epochs 2"):
    return {"class_names": [f"class_{i}" for i in range(C)], "class_counts": make_metrics()["class_counts"],
            "dataset": "uoft-cs/cifar10", "imbalance_factor": 100.0, "command": command, "best_epoch": 2,
            "selected_expert": selected, "epochs": 2, "wall_time_s": 42.0}


TRAIN_CONFIG = {"model": {"backbone": "resnet8_cifar_tiny", "num_experts": 3},
                "data": {"dataset": "uoft-cs/cifar10", "imbalance_factor": 100},
                "train": {"epochs": 2, "loss": "ncl"}}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def make_output_dir(root: Path, model: NCLModel, *, export=False, run_info=None, config=None) -> Path:
    """A training output folder as the trainer writes it (best/, eval/, run_info.json, config.yaml[, export/])."""
    out = Path(root)
    run_info = run_info or make_run_info()
    config = config or TRAIN_CONFIG
    metrics = make_metrics(selected=run_info["selected_expert"], num_experts=model.num_experts,
                           class_counts=run_info["class_counts"])
    hub.save_pretrained(model, out / "best", variant="ensemble", class_names=run_info["class_names"],
                        class_counts=run_info["class_counts"], config=config)
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (out / "eval" / "summary.md").write_text("# summary\n")
    (out / "eval" / "accuracy_by_group.png").write_bytes(PNG)
    (out / "run_info.json").write_text(json.dumps(run_info))
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    if export:
        common = dict(metrics=metrics, config=config, class_names=run_info["class_names"],
                      plots_dir=out / "eval", command=run_info["command"], run_info=run_info)
        hub.save_pretrained(model, out / "export" / "ensemble", variant="ensemble", **common)
        hub.save_pretrained(model, out / "export" / "expert", variant="expert", **common)
    return out


@pytest.fixture(scope="module")
def tiny() -> NCLModel:
    torch.manual_seed(0)
    model = timm.create_model("ncl_tiny_test").eval()
    with torch.no_grad():  # non-trivial BN statistics, so that a wrong buffer would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hub_or_none(tmp_path_factory):
    """The olah server, or None when olah is not installed."""
    if olah_cli() is None:
        yield None
        return
    server = LocalHub(tmp_path_factory.mktemp("local_hub")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_hub(hub_or_none):
    if hub_or_none is None:
        pytest.skip("olah is not installed (pip install -e '.[test]'): no local Hub server")
    return hub_or_none


@pytest.fixture(scope="module")
def upload_server(local_hub):
    server = UploadServer(local_hub).start()
    yield server
    server.stop()


@pytest.fixture
def offline_dead_endpoint(monkeypatch):
    """No network at all: offline mode and an endpoint where nothing listens."""
    point_hub_to(monkeypatch, f"http://127.0.0.1:{free_port()}", offline=True)


def _no_empty_section(text: str) -> None:
    body = text.split("\n---\n", 1)[1] if text.startswith("---") else text
    body = re.sub(r"```.*?```", "CODE", body, flags=re.S)  # '#' inside code blocks is not a heading
    lines = [line for line in body.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("#"):
            assert i + 1 < len(lines), f"empty section at the end: {line!r}"
            assert not lines[i + 1].startswith("#"), f"empty section {line!r} followed by {lines[i + 1]!r}"


# ---------------------------------------------------------------------------------------------- local round trips
def test_ensemble_round_trip_local_dir(tmp_path, x32):
    model = timm.create_model("ncl_tiny_test", moco=dict(queue_size=16)).eval()
    folder = hub.save_pretrained(model, tmp_path / "ens", class_names=[f"c{i}" for i in range(C)],
                                 config=TRAIN_CONFIG, plots_dir=None)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                         "training_config.yaml"]
    keys = safetensors.torch.load_file(folder / "model.safetensors").keys()
    assert keys and not any(k.startswith("moco.") for k in keys)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "ncl" and cfg["num_classes"] == C and cfg["label_names"][3] == "c3"
    assert cfg["model_args"] == model.model_args()
    assert not {"hf_hub_id", "url", "file", "source", "state_dict"} & set(cfg["pretrained_cfg"])
    assert cfg["pretrained_cfg"]["classifier"] == ["heads.0", "heads.1", "heads.2"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert cfg["ncl"]["variant"] == "ensemble" and cfg["ncl"]["source_num_experts"] == 3
    assert yaml.safe_load((folder / "training_config.yaml").read_text()) == TRAIN_CONFIG

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x32), model(x32))
    assert loaded.pretrained_cfg["label_names"][3] == "c3"
    again = hub.load_model(folder).eval()
    with torch.no_grad():
        assert torch.equal(again.forward_experts(x32), model.forward_experts(x32))


def test_expert_round_trip_defaults_to_selected(tmp_path, tiny, x32):
    metrics = make_metrics(selected=2)
    folder = hub.save_pretrained(tiny, tmp_path / "exp", variant="expert", metrics=metrics)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_args"]["num_experts"] == 1
    assert cfg["ncl"]["expert_index"] == 2 and cfg["ncl"]["source_num_experts"] == 3
    assert cfg["pretrained_cfg"]["first_conv"] == ["trunks.0.conv1"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert loaded.num_experts == 1
    with torch.no_grad():
        assert torch.equal(loaded(x32), tiny.forward_experts(x32)[2])
    with pytest.raises(ValueError, match="expert_index"):
        hub.save_pretrained(tiny, tmp_path / "none", variant="expert")


def test_load_model_new_classes_keeps_trunks_and_subsets_experts(tmp_path, tiny, x32):
    folder = hub.save_pretrained(tiny, tmp_path / "ens", class_names=[f"c{i}" for i in range(C)])
    model = hub.load_model(f"local-dir:{folder}", num_classes=4).eval()
    assert model.num_classes == 4 and model.heads[0].weight.shape == (4, model.expert_features)
    assert "label_names" not in model.pretrained_cfg  # the saved labels no longer apply
    for k in range(3):
        for (name, a), (_, b) in zip(model.trunks[k].state_dict().items(), tiny.trunks[k].state_dict().items()):
            assert torch.equal(a, b), name
    with torch.no_grad():
        assert model(x32).shape == (4, 4)
        assert torch.equal(model.forward_pooled(x32), tiny.forward_pooled(x32))
    sub = hub.load_model(str(folder), experts=[2, 0]).eval()
    with torch.no_grad():
        assert torch.equal(sub.forward_experts(x32), tiny.forward_experts(x32)[[2, 0]])


def test_init_from_subset_of_experts_and_heads(tmp_path, tiny, x32):
    folder = hub.save_pretrained(tiny, tmp_path / "ens")
    target = timm.create_model("ncl", backbone="resnet8_cifar_tiny", num_classes=C, num_experts=2,
                               moco=dict(queue_size=16))
    hub.init_from(target, folder, experts=[2, 0], load_heads=True)
    target.eval()
    with torch.no_grad():
        assert torch.equal(target.forward_experts(x32), tiny.forward_experts(x32)[[2, 0]])
    for a, b in zip(target.moco.key_trunks.state_dict().values(), target.trunks.state_dict().values()):
        assert torch.equal(a, b)  # momentum encoders reset to the loaded trunks
    first = timm.create_model("ncl", backbone="resnet8_cifar_tiny", num_classes=3, num_experts=2)
    with pytest.warns(UserWarning, match="heads not loaded"):
        hub.init_from(first, f"local-dir:{folder}", load_heads=True)  # default: the first K experts
    assert torch.equal(first.trunks[1].conv1.weight, tiny.trunks[1].conv1.weight)
    too_many = timm.create_model("ncl", backbone="resnet8_cifar_tiny", num_classes=C, num_experts=4)
    with pytest.raises(CheckpointMismatchError, match="has 3 expert"):
        hub.init_from(too_many, folder)


def test_init_from_errors(tmp_path, tiny):
    folder = hub.save_pretrained(tiny, tmp_path / "ens")
    other = timm.create_model("ncl", backbone="test_resnet", num_classes=C, num_experts=1)
    with pytest.raises(CheckpointMismatchError, match="backbone 'resnet8_cifar_tiny'.*'test_resnet'"):
        hub.init_from(other, folder)
    wider = timm.create_model("ncl", backbone="resnet8_cifar_tiny", num_classes=C, num_experts=1, in_chans=1)
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        hub.init_from(wider, folder)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointMismatchError, match="not an NCL or timm export"):
        hub.init_from(other, tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "bert" / "model.safetensors"))
    for call in (lambda: hub.init_from(other, tmp_path / "bert"), lambda: hub.load_model(tmp_path / "bert")):
        with pytest.raises(CheckpointMismatchError, match="not an NCL or timm export"):
            call()


def test_fine_tune_from_export_changes_heads(tmp_path, tiny):
    folder = hub.save_pretrained(tiny, tmp_path / "ens")
    model = hub.load_model(folder, num_classes=5, experts=[0, 1])
    heads_before = copy.deepcopy(model.heads.state_dict())
    trunk_before = model.trunks[0].conv1.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model.forward_experts(x).flatten(0, 1), y.repeat(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(not torch.equal(v, model.heads.state_dict()[k]) for k, v in heads_before.items())
    assert not torch.equal(trunk_before, model.trunks[0].conv1.weight)

    probe = hub.freeze_trunks(hub.load_model(folder, num_classes=5))
    assert not any(p.requires_grad for p in probe.trunks.parameters())
    assert all(p.requires_grad for p in probe.heads.parameters())


def test_non_json_model_args_clear_error(tmp_path):
    model = timm.create_model("ncl", backbone="test_resnet", num_classes=3, num_experts=1, act_layer=torch.nn.ReLU)
    with pytest.raises(ValueError, match="act_layer.*not JSON-serialisable"):
        hub.save_pretrained(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_export_leaves_the_global_rng_alone(tmp_path, tiny):
    """A run exports best/ between epochs: building the model that save_for_hf writes must not move the RNG that
    draws the next epoch's random anchor experts."""
    plain = timm.create_model("ncl", backbone="test_resnet", num_classes=3, num_experts=2)
    state = torch.get_rng_state()
    hub.save_pretrained(tiny, tmp_path / "ens")
    hub.save_pretrained(tiny, tmp_path / "exp", variant="expert", expert_index=1)
    hub.export_timm(plain, tmp_path / "plain")
    assert torch.equal(torch.get_rng_state(), state)


def test_interrupted_save_keeps_previous_export(tmp_path, tiny, monkeypatch):
    folder = hub.save_pretrained(tiny, tmp_path / "ens", metrics=make_metrics())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def interrupted(*args, **kwargs):
        assert list(tmp_path.glob(".ens.tmp-*")), "the temporary folder exists while writing"
        raise KeyboardInterrupt("simulated interruption while writing the card")

    monkeypatch.setattr(hub.export, "render_model_card", interrupted)
    other = timm.create_model("ncl_tiny_test")
    with pytest.raises(KeyboardInterrupt):
        hub.save_pretrained(other, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]  # no temporary or backup folder left


# ---------------------------------------------------------------------------------------------- model card
def test_model_card_front_matter_results_and_sections(tmp_path, tiny):
    metrics = make_metrics(selected=1)
    folder = hub.save_pretrained(tiny, tmp_path / "ens", metrics=metrics, config=TRAIN_CONFIG,
                                 class_counts=metrics["class_counts"], command="python recipes/train.py",
                                 repo_id="acme/ncl-tiny", run_info=make_run_info(), plots_dir=None)
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.license == "apache-2.0"
    assert set(hub.CARD_TAGS) <= set(data.tags)
    assert data.datasets == ["uoft-cs/cifar10"]
    assert data.base_model is None  # trained from scratch
    results = {(r.dataset_split, r.metric_name): r.metric_value for r in data.eval_results}
    assert results[("test", "Top-1 accuracy")] == metrics["splits"]["test"]["ensemble"]["top1"]
    assert results[("test", "Top-1 accuracy (few)")] == 12.5
    assert results[("val", "Top-1 accuracy (many)")] == metrics["splits"]["val"]["ensemble"]["many"]
    text = card.text
    for needle in ("resnet8_cifar_tiny", "Ensemble of 3 (this model)", "Expert 1 (selected)", "validation split",
                   "imbalance ratio 100.0", 'timm.create_model("hf-hub:acme/ncl-tiny", pretrained=True)',
                   "import ncl_hub", "resolve_data_config", "create_transform", "MoCo", "not selection numbers",
                   "Short schedule", "@inproceedings", "Guo, Guodong", "python recipes/train.py"):
        assert needle in text, needle
    _no_empty_section(card.content)

    expert = hub.save_pretrained(tiny, tmp_path / "exp", variant="expert", metrics=metrics, repo_id="acme/x-expert")
    expert_card = ModelCard.load(expert / "README.md")
    ex = {(r.dataset_split, r.metric_name): r.metric_value for r in expert_card.data.eval_results}
    assert ex[("test", "Top-1 accuracy")] == metrics["splits"]["test"]["experts"][1]["top1"]
    assert ("test", "Top-1 accuracy (few)") not in ex  # an empty group has no entry
    assert "Expert 1 (selected, this model)" in expert_card.text
    _no_empty_section(expert_card.content)


def test_model_card_without_metrics_and_with_pretrained_backbone(tmp_path):
    model = timm.create_model("ncl", backbone="test_resnet", num_classes=3, num_experts=2)
    folder = hub.save_pretrained(model, tmp_path / "bare", config={"model": {"pretrained_backbone": True}})
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    assert not card.data.eval_results and not card.data.datasets
    assert "No evaluation results were recorded" in card.text
    _no_empty_section(card.content)


def test_model_card_names_the_loss_options_that_depart_from_the_paper(tmp_path, tiny):
    def loss_line(name, loss):
        folder = hub.save_pretrained(tiny, tmp_path / name, config={"loss": loss, "epochs": 2})
        return next(line for line in ModelCard.load(folder / "README.md").text.splitlines() if "**Loss:**" in line)

    paper = {"name": "ncl", "variant": "paper", "hard_ratio": 0.3, "distill_weight": 0.6, "ramp_steps": 0,
             "hard_weight": 1.0}
    assert loss_line("a", paper) == "- **Loss:** `ncl` (variant paper, beta 0.3, lambda 0.6)"
    changed = {**paper, "variant": "official", "hard_weight": 0.0, "ramp_steps": 250}
    assert loss_line("b", changed) == (
        "- **Loss:** `ncl` (variant official, beta 0.3, lambda 0.6; not in the paper: hard-category terms weighted 0 "
        "(hard_weight); hard-category and distillation terms ramped in over 250 steps (ramp_steps))")
    assert loss_line("c", {"name": "bsce"}) == "- **Loss:** `bsce`"


# ---------------------------------------------------------------------------------------------- plain timm
def _plain_source():
    torch.manual_seed(4)
    return timm.create_model("ncl", backbone="test_resnet", num_classes=5, num_experts=2).eval()


def test_plain_timm_export_round_trip(tmp_path, hub_or_none):
    model = _plain_source()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    folder = hub.export_timm(model, tmp_path / "plain", expert_index=1, class_names=list("abcde"),
                             metrics=make_metrics(selected=1, num_experts=2, class_counts=[50, 20, 10, 5, 2]))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["ncl"]["format"] == "timm"
    assert "tag" not in cfg["pretrained_cfg"] and "hf_hub_id" not in cfg["pretrained_cfg"]
    torch.save({"x": x, "y": model.forward_experts(x)[1].detach()}, tmp_path / "io.pt")
    # one fresh interpreter (importing torch + timm costs seconds) that never imports ncl_hub loads the export
    # from the folder and, through the local Hub server, from a Hub repo
    specs = [f"local-dir:{folder}"]
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    if hub_or_none is not None:
        hub_or_none.add_repo("ncl-test/plain-expert", folder)
        specs.append("hf-hub:ncl-test/plain-expert")
        env.update(HF_ENDPOINT=hub_or_none.endpoint, HF_HUB_OFFLINE="0")
    else:
        warnings.warn("olah not installed: the plain timm export is not loaded through a Hub server")
    code = (
        "import sys, timm, torch\n"
        f"d = torch.load(r'{tmp_path / 'io.pt'}')\n"
        f"for spec in {specs!r}:\n"
        "    m = timm.create_model(spec, pretrained=True).eval()\n"
        "    with torch.no_grad(): assert torch.equal(m(d['x']), d['y']), spec\n"
        "    assert m.pretrained_cfg['label_names'] == ['a', 'b', 'c', 'd', 'e'], spec\n"
        "assert 'ncl_hub' not in sys.modules and not timm.is_model('ncl')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    card = ModelCard.load(folder / "README.md")
    assert "import ncl_hub" not in card.text and "plain timm model" in card.text
    _no_empty_section(card.content)

    as_ncl = hub.load_model(f"local-dir:{folder}").eval()
    assert isinstance(as_ncl, NCLModel) and as_ncl.num_experts == 1 and as_ncl.backbone == "test_resnet"
    with torch.no_grad():
        assert torch.equal(as_ncl(x), model.forward_experts(x)[1])
    new_head = hub.load_model(folder, num_classes=3).eval()
    with torch.no_grad():
        assert new_head(x).shape == (2, 3)
        assert torch.equal(new_head.forward_pooled(x)[0], model.forward_pooled(x)[1])
    target = timm.create_model("ncl", backbone="test_resnet", num_classes=5, num_experts=2).eval()
    hub.init_from(target, folder, experts=[0, 0], load_heads=True)
    with torch.no_grad():
        assert torch.equal(target.forward_experts(x)[1], model.forward_experts(x)[1])


def test_export_timm_refuses_cosine_heads_and_foreign_trunks(tmp_path, tiny):
    cosine = timm.create_model("ncl", backbone="test_resnet", num_classes=3, num_experts=1, classifier="cosine")
    assert isinstance(cosine.heads[0], CosineClassifier)
    with pytest.raises(ValueError, match="CosineClassifier head.*timm classifiers are linear"):
        hub.export_timm(cosine, tmp_path / "cos")
    with pytest.raises(ValueError, match="'resnet8_cifar_tiny' is registered by ncl_hub.*not by timm"):
        hub.export_timm(tiny, tmp_path / "cifar")
    out = make_output_dir(tmp_path / "run", tiny)
    with pytest.raises(ValueError, match="not by timm"):
        hub.publish(out, "acme/tiny", dry_run=True, format="timm")
    assert not (out / "publish").exists()  # refused before anything is staged
    assert not list((tmp_path).glob("cos*")) and not list(tmp_path.glob("cifar*"))


# ---------------------------------------------------------------------------------------------- publish
def _load_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("publish_recipe", REPO / "recipes" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_dry_run_writes_both_folders(tmp_path, tiny, x32, offline_dead_endpoint):
    out = make_output_dir(tmp_path / "run", tiny)
    result = _load_recipe().main([str(out), "--repo-id", "acme/ncl-tiny", "--dry-run"])
    assert result["dry_run"] and result["ensemble"]["url"] is None
    ens, exp = Path(result["ensemble"]["folder"]), Path(result["expert"]["folder"])
    assert ens == out / "publish" / "ensemble" and exp == out / "publish" / "expert"
    for folder in (ens, exp):
        assert {"README.md", "config.json", "model.safetensors", "training_config.yaml",
                "accuracy_by_group.png"} <= {p.name for p in folder.iterdir()}
    assert 'hf-hub:acme/ncl-tiny"' in (ens / "README.md").read_text()
    assert 'hf-hub:acme/ncl-tiny-expert"' in (exp / "README.md").read_text()
    with torch.no_grad():
        assert torch.equal(hub.load_model(ens).eval()(x32), tiny(x32))
        assert torch.equal(hub.load_model(exp).eval()(x32), tiny.forward_experts(x32)[1])


@pytest.mark.parametrize("export", [True, False], ids=["reuse-export", "build-from-best"])
def test_publish_dry_run_redacts_token(tmp_path, tiny, offline_dead_endpoint, export):
    run_info = make_run_info(command=f"python recipes/train.py --hub-token {FAKE_TOKEN}")
    out = make_output_dir(tmp_path / "run", tiny, export=export, run_info=run_info,
                          config=dict(TRAIN_CONFIG, hub={"token": FAKE_TOKEN}))
    result = hub.publish(out, "acme/ncl-tiny", dry_run=True, token=FAKE_TOKEN)
    assert grep_tree(out / "publish", FAKE_TOKEN) == []
    assert "--hub-token REDACTED" in (out / "publish" / "ensemble" / "README.md").read_text()
    staged_config = yaml.safe_load((out / "publish" / "expert" / "training_config.yaml").read_text())
    assert staged_config["hub"]["token"] == "REDACTED"
    if not export:
        return
    for name in ("ensemble", "expert"):
        staged = Path(result[name]["folder"])
        exported = out / "export" / name
        assert (staged / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()
        assert (staged / "config.json").read_bytes() == (exported / "config.json").read_bytes()
        assert f'hf-hub:{result[name]["repo_id"]}"' in (staged / "README.md").read_text()


def test_publish_format_timm_expert(tmp_path, offline_dead_endpoint):
    model = _plain_source()
    run_info = dict(make_run_info(selected=1), class_names=list("abcde"), class_counts=[50, 20, 10, 5, 2])
    out = make_output_dir(tmp_path / "run", model, run_info=run_info)
    result = hub.publish(out, "acme/plain", dry_run=True, format="timm")
    assert json.loads((Path(result["expert"]["folder"]) / "config.json").read_text())["architecture"] == "test_resnet"
    assert json.loads((Path(result["ensemble"]["folder"]) / "config.json").read_text())["architecture"] == "ncl"


def test_publish_without_token_fails_before_network(tmp_path, tiny, monkeypatch, offline_dead_endpoint):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    out = make_output_dir(tmp_path / "run", tiny)
    with pytest.raises(ValueError, match="no Hugging Face token"):
        hub.publish(out, "acme/ncl-tiny")


# ---------------------------------------------------------------------------------------------- local Hub server
def test_download_from_local_hub(tmp_path, tiny, x32, local_hub, monkeypatch):
    ens = hub.save_pretrained(tiny, tmp_path / "ens", metrics=make_metrics(), repo_id="ncl-test/tiny")
    exp = hub.save_pretrained(tiny, tmp_path / "exp", variant="expert", metrics=make_metrics())
    sha = local_hub.add_repo("ncl-test/tiny", ens)
    local_hub.add_repo("ncl-test/tiny-expert", exp)
    point_hub_to(monkeypatch, local_hub.endpoint)
    cache = tmp_path / "cache"

    path = hf_hub_download("ncl-test/tiny", "config.json", cache_dir=cache)
    assert Path(path).read_bytes() == (ens / "config.json").read_bytes() and sha in path
    snapshot = Path(snapshot_download("ncl-test/tiny", cache_dir=cache))
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == {p.name: p.read_bytes() for p in ens.iterdir()}
    model = timm.create_model("hf-hub:ncl-test/tiny", pretrained=True, cache_dir=cache).eval()
    expert = hub.load_model("hf-hub:ncl-test/tiny-expert", cache_dir=cache).eval()
    with torch.no_grad():
        assert torch.equal(model(x32), tiny(x32))
        assert torch.equal(expert(x32), tiny.forward_experts(x32)[1])
    target = timm.create_model("ncl", backbone="resnet8_cifar_tiny", num_classes=C, num_experts=1)
    hub.init_from(target, "hf-hub:ncl-test/tiny", experts=[2], load_heads=True)
    with torch.no_grad():
        assert torch.equal(target.eval()(x32), tiny.forward_experts(x32)[2])

    # the Hub cache layout: refs/main -> the served commit, snapshots/<commit>/ -> blobs
    repo_cache = cache / "models--ncl-test--tiny"
    assert (repo_cache / "refs" / "main").read_text().strip() == sha
    assert (repo_cache / "snapshots" / sha / "model.safetensors").resolve().parent == repo_cache / "blobs"
    # the Hub cache alone serves a second load: offline, and nothing listening at the endpoint
    point_hub_to(monkeypatch, f"http://127.0.0.1:{free_port()}", offline=True)
    cached = timm.create_model("hf-hub:ncl-test/tiny", pretrained=True, cache_dir=cache).eval()
    with torch.no_grad():
        assert torch.equal(cached(x32), tiny(x32))
    with pytest.raises(WeightsUnavailableError, match="(?s)ncl-test/never-downloaded.*local-dir:"):
        hub.load_model("hf-hub:ncl-test/never-downloaded", cache_dir=cache)


def test_missing_weights_errors(tmp_path, tiny, local_hub, monkeypatch):
    folder = hub.save_pretrained(tiny, tmp_path / "ens")
    (folder / "model.safetensors").unlink()
    local_hub.add_repo("ncl-test/no-weights", folder)
    point_hub_to(monkeypatch, local_hub.endpoint)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsUnavailableError, match="(?s)'ncl-test/no-weights'.*local-dir:"):
        timm.create_model("hf-hub:ncl-test/no-weights", pretrained=True, cache_dir=cache)
    with pytest.raises(WeightsUnavailableError, match="(?s)'ncl-test/does-not-exist'.*local-dir:"):
        hub.load_model("hf-hub:ncl-test/does-not-exist", cache_dir=cache)
    with pytest.raises(WeightsUnavailableError, match="(?s)'ncl-test/does-not-exist'.*local-dir:"):
        hub.init_from(timm.create_model("ncl_tiny_test"), "hf-hub:ncl-test/does-not-exist")
    point_hub_to(monkeypatch, f"http://127.0.0.1:{free_port()}", offline=True)
    with pytest.raises(WeightsUnavailableError, match="(?s)ncl-hub/ncl_resnet32_cifar10lt-expert.*local-dir:"):
        hub.load_model("ncl_resnet32_cifar10lt.expert", cache_dir=cache)
    with pytest.raises(WeightsUnavailableError, match="(?s)'ncl_tiny_test' has no published weights.*local-dir:"):
        hub.load_model("ncl_tiny_test")


def test_publish_uploads_to_local_hub_without_leaking_token(tmp_path, tiny, x32, local_hub, upload_server,
                                                            monkeypatch, caplog):
    caplog.set_level("DEBUG")
    out = make_output_dir(tmp_path / "run", tiny)
    point_hub_to(monkeypatch, upload_server.endpoint)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # the token comes from the environment, not an argument
    result = hub.publish(out, "ncl-test/published", commit_message="publish test")
    assert result["ensemble"]["commit"] and result["expert"]["repo_id"] == "ncl-test/published-expert"
    assert set(upload_server.tokens) == {FAKE_TOKEN}
    assert "POST /api/models/ncl-test/published-expert/commit/main" in upload_server.requests

    point_hub_to(monkeypatch, local_hub.endpoint)
    cache = tmp_path / "cache"
    ensemble = timm.create_model("hf-hub:ncl-test/published", pretrained=True, cache_dir=cache).eval()
    expert = timm.create_model("hf-hub:ncl-test/published-expert", pretrained=True, cache_dir=cache).eval()
    with torch.no_grad():
        assert torch.equal(ensemble(x32), tiny(x32))
        assert torch.equal(expert(x32), tiny.forward_experts(x32)[1])
    card = ModelCard.load(hf_hub_download("ncl-test/published", "README.md", cache_dir=cache))
    assert card.data.eval_results

    for root in (out, cache, local_hub.repo_dir("ncl-test/published"), local_hub.repo_dir("ncl-test/published-expert")):
        assert grep_tree(root, FAKE_TOKEN) == [], root
    for repo in ("ncl-test/published", "ncl-test/published-expert"):
        history = subprocess.run(["git", "log", "-p", "--all"], cwd=local_hub.repo_dir(repo), capture_output=True,
                                 text=True, check=True).stdout
        assert FAKE_TOKEN not in history
    assert FAKE_TOKEN not in caplog.text


@pytest.mark.skipif(not (os.environ.get("HF_TOKEN") and os.environ.get("NCL_HUB_TEST_REPO")),
                    reason="real Hub upload: set HF_TOKEN and NCL_HUB_TEST_REPO=ORG/NAME (a repo you may overwrite)")
def test_publish_to_real_hub(tmp_path, tiny, x32, monkeypatch):
    point_hub_to(monkeypatch, os.environ.get("NCL_HUB_TEST_ENDPOINT", "https://huggingface.co"))
    out = make_output_dir(tmp_path / "run", tiny)
    repo_id = os.environ["NCL_HUB_TEST_REPO"]
    result = hub.publish(out, repo_id, private=True)
    model = timm.create_model(f"hf-hub:{result['ensemble']['repo_id']}@{result['ensemble']['commit']}",
                              pretrained=True, cache_dir=tmp_path / "cache").eval()
    with torch.no_grad():
        assert torch.equal(model(x32), tiny(x32))
    assert grep_tree(out, os.environ["HF_TOKEN"]) == []


def test_train_push_to_hub_publishes_both_repos(tmp_path, tiny_data, local_hub, upload_server, monkeypatch, x32):
    from conftest import TINY

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import train as train_recipe

    point_hub_to(monkeypatch, upload_server.endpoint)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    out = tmp_path / "run"
    result = train_recipe.main([*TINY, "--data.dataset", str(tiny_data), "--epochs", "1", "--output_dir", str(out),
                                "--push_to_hub", "ncl-test/trained"])
    assert result["hub"]["expert"]["repo_id"] == "ncl-test/trained-expert"
    point_hub_to(monkeypatch, local_hub.endpoint)
    expert = timm.create_model("hf-hub:ncl-test/trained-expert", pretrained=True, cache_dir=tmp_path / "c").eval()
    local = timm.create_model(f"local-dir:{out / 'export' / 'expert'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(expert(x32), local(x32))
    assert grep_tree(out, FAKE_TOKEN) == []
