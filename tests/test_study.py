"""The study runner on tiny data: two methods x two seeds, a killed run resumed, the report regenerated; and, on
fake finished run folders and records, schedule-length studies (methods taken from another study's record, seeds
per method, series paired at equal epochs)."""
import json
import shutil
import sys

import pytest
import yaml

import benchmarks.study as S
from benchmarks.study import report, run
from benchmarks.study.record import _stats
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
    assert run._lock_owner(held) is None


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
    one = _stats([31.2])
    assert report._fmt(one) == "31.20 (1 seed)" and report._fmt(_stats([-3.25]), signed=True) == "-3.25 (1 seed)"
    two = _stats([30.0, 32.0])
    assert report._fmt(two) == "31.00 ± 1.41 (30.0, 32.0)" and report._fmt(_stats([])) == "n/a"


def test_results_page_orders_studies_by_position_then_name(tmp_path, monkeypatch):
    records = tmp_path / "records"
    records.mkdir()
    for name, position in (("a_last", None), ("b_second", 2), ("c_first", 1)):
        (records / f"{name}.json").write_text(json.dumps({"name": name, "position": position}))
    monkeypatch.setattr(report, "render_study", lambda r, **kw: f"## {r['name']}")
    page = S.write_results(records, tmp_path / "results.md")
    text = page.read_text()
    assert text.index("## c_first") < text.index("## b_second") < text.index("## a_last")


# ---------------------------------------------------------------------------------------------- schedule studies
def _fake_run(run_dir, test, val, test_ensemble=None):
    """A finished run folder with just the files ``collect`` reads: top-1 of the selected expert and the ensemble
    (which gains as much on validation as on test)."""
    def split(single, ensemble):
        return {"experts": [{"top1": single}], "ensemble": {"top1": ensemble}}

    (run_dir / "eval").mkdir(parents=True)
    gain = 0.0 if test_ensemble is None else test_ensemble - test
    splits = {"val": split(val, val + gain), "test": split(test, test + gain)}
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"selected_expert": 0, "splits": splits}))
    (run_dir / "run_info.json").write_text(json.dumps({"history": [], "commit": "abc1234", "best_epoch": 1,
                                                       "wall_time_s": 1.0}))


def _source_record(tmp_path, tiny_data, results):
    """The record of an earlier study ``src`` (2 epochs): bsce_k1 and ncl at seeds 0 and 1, test top-1 40/42 and
    41/45 (ncl's ensemble 43/46)."""
    study = S.load_study(_write_study(tmp_path, tiny_data, name="src", output_root=str(tmp_path / "src_runs")))
    for seed, (bsce, ncl, ncl_ens) in enumerate(((40.0, 41.0, 43.0), (42.0, 45.0, 46.0))):
        _fake_run(study.run_dir("bsce_k1", seed), bsce, bsce - 1)
        _fake_run(study.run_dir("ncl", seed), ncl, ncl - 2, ncl_ens)
    results.mkdir(exist_ok=True)
    (results / "src.json").write_text(json.dumps(S.collect(study)))


def _schedule_study(tmp_path, tiny_data, **extra):
    """``sched``: BSCE and NCL at 2 epochs taken from ``src`` (NCL at seed 1 only), and trained at 4 epochs (seed 0)."""
    methods = {
        "bsce_e2": {"label": "BSCE", "series": "bsce", "from": "src/bsce_k1"},
        "ncl_e2": {"label": "NCL", "series": "ncl", "from": "src/ncl", "seeds": [1]},
        "bsce_e4": {"label": "BSCE", "series": "bsce", "seeds": [0],
                    "overrides": {"loss.name": "bsce", "model.num_experts": 1, "epochs": 4}},
        "ncl_e4": {"label": "NCL", "series": "ncl", "seeds": [0], "overrides": {"model.num_experts": 2, "epochs": 4}},
    }
    spec = dict(name="sched", output_root=str(tmp_path / "sched_runs"), series={"bsce": "BSCE", "ncl": "NCL"},
                methods=methods, baseline="bsce", findings="NCL at 4 epochs: {{diff:ncl_e4:test/single/top1}}.")
    return _write_study(tmp_path, tiny_data, **{**spec, **extra})


def test_schedule_study_takes_runs_from_a_record_and_pairs_series_at_equal_epochs(tmp_path, tiny_data, capsys):
    results, page = tmp_path / "results", tmp_path / "results.md"
    _source_record(tmp_path, tiny_data, results)
    path = _schedule_study(tmp_path, tiny_data)
    study = S.load_study(path)
    # only the 4-epoch methods train, at their own seeds; --seeds respects them
    assert [(m.name, s) for m, s in study.runs()] == [("bsce_e4", 0), ("ncl_e4", 0)]
    assert study.runs(seeds=[1]) == [] and study.runs(["ncl_e2"]) == []
    assert study_recipe.main(["--config", str(path), "--dry-run", "--results-dir", str(results)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"[from] bsce_e2: the runs of src/bsce_k1 in {results / 'src.json'} (seeds 0, 1)",
                           f"[from] ncl_e2: the runs of src/ncl in {results / 'src.json'} (seeds 1)"]
    assert len(printed) == 4 and printed[2].endswith("bsce_e4/seed_0") and printed[3].endswith("ncl_e4/seed_0")

    _fake_run(study.run_dir("bsce_e4", 0), 50.0, 48.0)
    _fake_run(study.run_dir("ncl_e4", 0), 54.0, 51.0, 57.0)
    argv = ["--config", str(path), "--report", "--results-dir", str(results), "--markdown", str(page)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="plots"):
            study_recipe.main(argv)
        return
    assert study_recipe.main(argv) == 0
    record = json.loads((results / "sched.json").read_text())
    methods = record["methods"]
    assert not (tmp_path / "sched_runs" / "bsce_e2").exists() and not (tmp_path / "sched_runs" / "ncl_e2").exists()
    assert methods["bsce_e2"]["from"] == "src/bsce_k1" and list(methods["bsce_e2"]["runs"]) == ["0", "1"]
    assert list(methods["ncl_e2"]["runs"]) == ["1"] and methods["ncl_e2"]["seeds"] == [1]
    assert [methods[n]["epochs"] for n in ("bsce_e2", "ncl_e2", "bsce_e4", "ncl_e4")] == [2, 2, 4, 4]
    # each NCL method against the BSCE method of its own length, seed by seed: 45 - 42 at 2 epochs, 54 - 50 at 4
    d2, d4 = record["differences"]["ncl_e2"], record["differences"]["ncl_e4"]
    assert d2["baseline"] == "bsce_e2" and d2["seeds"] == [1] and d4["baseline"] == "bsce_e4"
    assert d2["vs_baseline_single"]["test/single/top1"]["values"] == [3.0]
    assert d2["vs_baseline_single"]["test/ensemble/top1"]["values"] == [4.0]
    assert d4["vs_baseline_single"]["test/single/top1"]["values"] == [4.0]
    assert d4["vs_baseline_single"]["test/ensemble/top1"]["values"] == [7.0]
    assert set(record["differences"]) == {"ncl_e2", "ncl_e4"}

    text = page.read_text()
    table = text[text.index("### Schedule length"):]
    assert "| series | | 2 epochs | 4 epochs |" in table
    assert "| NCL | test single minus baseline | +3.00 (1 seed) | +4.00 (1 seed) |" in table
    assert "|  | test ensemble minus baseline | +4.00 (1 seed) | +7.00 (1 seed) |" in table
    assert "|  | validation | 43.00 (1 seed) / 44.00 (1 seed) | 51.00 (1 seed) / 54.00 (1 seed) |" in table
    assert "| BSCE (baseline) | validation | 40.00 ± 1.41 | 48.00 (1 seed) |" in table
    assert "| NCL, 4 epochs | 1 | single |" in text and "NCL at 4 epochs: +4.00 (1 seed)." in text
    assert "![Paired test difference to BSCE against schedule length](results/sched_schedule.png)" in text
    assert (results / "sched_schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_baseline_naming_a_method_gives_todays_record_and_page(tmp_path, tiny_data):
    results = tmp_path / "results"
    _source_record(tmp_path, tiny_data, results)
    record = json.loads((results / "src.json").read_text())
    assert set(record) == {"name", "position", "title", "description", "findings", "study_file", "config", "common",
                           "seeds", "baseline", "methods", "commits", "differences"}
    assert all(set(m) == {"label", "overrides", "runs", "summary"} for m in record["methods"].values())
    assert set(record["differences"]["ncl"]) == {"seeds", "vs_baseline_single"}
    assert "Schedule length" not in S.render_study(record)
    # the committed records still give the committed page, byte for byte
    committed = REPO / "docs" / "results"
    for source in committed.glob("*.json"):
        shutil.copy(source, results / source.name)
    (results / "src.json").unlink()
    page = S.write_results(results, tmp_path / "results.md")
    assert page.read_text() == (REPO / "docs" / "results.md").read_text()


def test_a_from_naming_a_missing_record_or_method_is_an_error_naming_it(tmp_path, tiny_data):
    results = tmp_path / "results"
    path = _schedule_study(tmp_path, tiny_data)
    with pytest.raises(ConfigError, match="bsce_e2 takes its runs from src/bsce_k1, but there is no record .*src.json"):
        S.collect(S.load_study(path), results)
    _source_record(tmp_path, tiny_data, results)
    methods = {"bsce_e2": {"series": "bsce", "from": "src/bsce_k2"}}
    study = S.load_study(_schedule_study(tmp_path, tiny_data, methods=methods))
    with pytest.raises(ConfigError, match="the record .*src.json has no method bsce_k2; its methods are bsce_k1, ncl"):
        study_recipe.main(["--config", str(study.source), "--dry-run", "--results-dir", str(results)])


@pytest.mark.parametrize("method, message", [
    ({"from": "src", "series": "bsce"}, "write it as STUDY/METHOD"),
    ({"from": "src/bsce_k1", "overrides": {"epochs": 3}}, "so it has no overrides"),
    ({"seeds": [5], "overrides": {}}, r"seeds \[5\]; give some of the study's seeds"),
    ({"series": "nope", "overrides": {}}, "series 'nope'"),
    ({"serie": "bsce", "overrides": {}}, r"unknown keys \['serie'\]"),
])
def test_bad_schedule_keys_are_refused(tmp_path, tiny_data, method, message):
    with pytest.raises(ConfigError, match=message):
        S.load_study(_schedule_study(tmp_path, tiny_data, methods={"m": method}))


def test_two_methods_of_one_series_and_length_or_a_length_without_baseline_are_errors(tmp_path, tiny_data):
    results = tmp_path / "results"
    _source_record(tmp_path, tiny_data, results)
    both = {"a": {"series": "ncl", "from": "src/ncl"}, "b": {"series": "ncl", "from": "src/ncl"},
            "c": {"series": "bsce", "from": "src/bsce_k1"}}
    with pytest.raises(ConfigError, match="a and b are both series ncl at 2 epochs"):
        S.collect(S.load_study(_schedule_study(tmp_path, tiny_data, methods=both)), results)
    lone = {"a": {"series": "ncl", "overrides": {"epochs": 4}}, "c": {"series": "bsce", "from": "src/bsce_k1"}}
    with pytest.raises(ConfigError, match="a trains 4 epochs, but the baseline series bsce has no method of 4"):
        S.collect(S.load_study(_schedule_study(tmp_path, tiny_data, methods=lone)), results)
