"""The study runner on tiny data: two methods x two seeds, a killed run resumed, the report regenerated."""
import json
import shutil
import sys

import pytest
import yaml

from ncl_hub import study as S
from ncl_hub.config import ConfigError

from conftest import REPO, TINY

sys.path.insert(0, str(REPO / "recipes"))

import study as study_recipe  # noqa: E402


def _tiny_overrides():
    pairs = dict(zip(TINY[::2], TINY[1::2]))
    return {k.lstrip("-"): v for k, v in pairs.items()}


def _write_study(tmp_path, tiny_data, **extra):
    config = tmp_path / "base.yaml"
    config.write_text("loss: {name: ncl}\noptim: {lr: 0.05}\n")
    spec = {
        "name": "tiny_study", "title": "Tiny study", "description": "Two methods on tiny data.",
        "config": "base.yaml", "output_root": str(tmp_path / "runs"), "seeds": [0, 1],
        "common": {**_tiny_overrides(), "data.dataset": str(tiny_data), "epochs": 2, "eval_splits": ["val", "test"]},
        "methods": {"bsce_k1": {"label": "BSCE K=1", "overrides": {"loss.name": "bsce", "model.num_experts": 1}},
                    "ncl": {"label": "NCL K=2", "overrides": {"model.num_experts": 2}}},
        "baseline": "bsce_k1",
        "findings": "NCL's ensemble: {{ncl:test/ensemble/top1}}; single minus BSCE: {{diff:ncl:test/single/top1}}.",
        **extra}
    path = tmp_path / "tiny_study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_bad_study_files_are_refused_before_training(tmp_path, tiny_data):
    path = _write_study(tmp_path, tiny_data, methods={"a": {"overrides": {"optim.lrr": 0.1}}}, baseline=None)
    with pytest.raises(ConfigError, match="optim.lrr"):
        S.load_study(path)
    path = _write_study(tmp_path, tiny_data, baseline="nope")
    with pytest.raises(ConfigError, match="baseline 'nope'"):
        S.load_study(path)
    with pytest.raises(ConfigError, match="does not exist"):
        S.load_study(tmp_path / "missing.yaml")


def test_study_runs_resumes_and_reports(tmp_path, tiny_data):
    path = _write_study(tmp_path, tiny_data)
    results, page = tmp_path / "results", tmp_path / "results.md"
    argv = ["--config", str(path), "--jobs", "2", "--results-dir", str(results), "--markdown", str(page)]
    assert study_recipe.main(argv) == 0
    study = S.load_study(path)
    run_dirs = [study.run_dir(m.name, s) for m, s in study.runs()]
    assert len(run_dirs) == 4 and all(S.is_finished(d) for d in run_dirs)

    # a run killed after its first epoch: only that epoch's checkpoint is left, nothing of the end of the run
    killed = study.run_dir("ncl", 1)
    first_metrics = json.loads((killed / "eval" / "metrics.json").read_text())
    for sub in ("eval", "export"):
        shutil.rmtree(killed / sub)
    (killed / "run_info.json").unlink()
    for ckpt in (killed / "checkpoints").iterdir():
        if ckpt.name != "epoch_0000":
            shutil.rmtree(ckpt)
    other_log = (study.run_dir("ncl", 0) / "train.log").read_text()
    assert study_recipe.main(argv) == 0
    log = (killed / "train.log").read_text()
    assert "resumed from" in log and "epoch_0000" in log
    assert (study.run_dir("ncl", 0) / "train.log").read_text() == other_log  # finished runs are skipped
    again = json.loads((killed / "eval" / "metrics.json").read_text())
    assert again["splits"]["test"]["ensemble"]["top1"] == first_metrics["splits"]["test"]["ensemble"]["top1"]

    # the record and the page come from the run folders
    record = json.loads((results / "tiny_study.json").read_text())
    assert record["seeds"] == [0, 1] and set(record["methods"]) == {"bsce_k1", "ncl"}
    ncl = record["methods"]["ncl"]
    values = [ncl["runs"][str(s)]["splits"]["test"]["ensemble"]["top1"] for s in (0, 1)]
    stat = ncl["summary"]["test/ensemble/top1"]
    assert stat["values"] == values and stat["mean"] == pytest.approx(sum(values) / 2)
    sel = json.loads((study.run_dir("ncl", 0) / "run_info.json").read_text())["selected_expert"]
    m0 = json.loads((study.run_dir("ncl", 0) / "eval" / "metrics.json").read_text())
    assert ncl["runs"]["0"]["splits"]["test"]["single"]["top1"] == m0["splits"]["test"]["experts"][sel]["top1"]
    diff = record["differences"]["ncl"]["vs_baseline_single"]["test/single/top1"]
    base = record["methods"]["bsce_k1"]["runs"]
    assert diff["values"][0] == pytest.approx(ncl["runs"]["0"]["splits"]["test"]["single"]["top1"]
                                              - base["0"]["splits"]["test"]["single"]["top1"])
    assert all(r["commit"] for r in ncl["runs"].values())
    # the resumed run's training time counts the epoch trained before the kill, not only the last process's
    history = json.loads((killed / "run_info.json").read_text())["history"]
    assert len(history) == 2 and ncl["runs"]["1"]["train_time_s"] == pytest.approx(sum(h["time_s"] for h in history),
                                                                                   abs=0.1)
    text = page.read_text()
    assert "## Tiny study" in text and "| NCL K=2 | 2 | ensemble |" in text and "single (K = 1)" in text
    assert f"{stat['mean']:.2f} ± {stat['std']:.2f}" in text
    assert (f"NCL's ensemble: {stat['mean']:.2f} ± {stat['std']:.2f}; single minus BSCE: "
            f"{diff['mean']:+.2f} ± {diff['std']:.2f}.") in text
    with pytest.raises(ValueError, match="nope:test/top1"):
        S.fill_numbers("{{nope:test/top1}}", record)
    # --report regenerates the same page from the records alone
    page.unlink()
    assert study_recipe.main(["--report", "--results-dir", str(results), "--markdown", str(page)]) == 0
    assert page.read_text() == text


def test_runs_held_by_another_runner_are_left_to_it(tmp_path, tiny_data):
    import os

    study = S.load_study(_write_study(tmp_path, tiny_data, seeds=[0]))
    held = study.run_dir("ncl", 0)
    held.mkdir(parents=True)
    (held / ".lock").write_text(str(os.getpid()))  # a live process holds it
    lines = []
    assert S.run_study(study, only=["ncl"], log=lines.append) == []
    assert any("held by pid" in line for line in lines) and not (held / "train.log").exists()
    (held / ".lock").write_text("999999999")  # a stale lock (no such process) is ignored
    assert S._lock_owner(held) is None


def test_only_and_seeds_narrow_the_runs_and_a_typo_is_an_error(tmp_path, tiny_data, capsys):
    path = _write_study(tmp_path, tiny_data, seeds=[0, 1])
    study = S.load_study(path)
    assert [(m.name, s) for m, s in study.runs(["ncl"], [1])] == [("ncl", 1)]
    assert len(study.runs()) == 2 * len(study.methods)
    for only, seeds, name in ((["ncl_typo"], None, "ncl_typo"), (None, [7], "7")):
        with pytest.raises(ConfigError, match=f"has no method or seed {name}"):
            study.runs(only, seeds)
    # the dry run lists exactly the runs a real one would start
    assert study_recipe.main(["--config", str(path), "--only", "ncl", "--seeds", "1", "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith("[new]") and printed[0].endswith("ncl/seed_1")


def test_changed_settings_are_not_resumed_into_an_old_run(tmp_path, tiny_data):
    path = _write_study(tmp_path, tiny_data, seeds=[0])
    study = S.load_study(path)
    run_dir = study.run_dir("ncl", 0)
    run_dir.mkdir(parents=True)
    from ncl_hub.config import parse_args, save_config

    cfg = parse_args(S.run_argv(study, study.methods[1], 0))
    cfg.epochs = 99
    save_config(cfg, run_dir / "config.yaml")
    with pytest.raises(ConfigError, match="other settings.*epochs: 99 -> 2"):
        S.run_study(study, only=["ncl"], log=lambda *_: None)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"optim": {"warmup_epochs": 5}}))
    with pytest.raises(ConfigError, match="cannot read"):
        S.run_study(study, only=["ncl"], log=lambda *_: None)


def test_numbers_from_one_seed_say_so_instead_of_a_zero_spread():
    one = S._stats([31.2])
    assert S._fmt(one) == "31.20 (1 seed)" and S._fmt(S._stats([-3.25]), signed=True) == "-3.25 (1 seed)"
    two = S._stats([30.0, 32.0])
    assert S._fmt(two) == "31.00 ± 1.41 (30.0, 32.0)" and S._fmt(S._stats([])) == "n/a"


def test_results_page_orders_studies_by_position_then_name(tmp_path, monkeypatch):
    records = tmp_path / "records"
    records.mkdir()
    for name, position in (("a_last", None), ("b_second", 2), ("c_first", 1)):
        (records / f"{name}.json").write_text(json.dumps({"name": name, "position": position}))
    monkeypatch.setattr(S, "render_study", lambda r: f"## {r['name']}")
    page = S.write_results(records, tmp_path / "results.md")
    text = page.read_text()
    assert text.index("## c_first") < text.index("## b_second") < text.index("## a_last")
