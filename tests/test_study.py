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
    assert run._lock_owner(held / ".lock") is None


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


# -------------------------------------------------------------------------------------------- deployment studies
from ncl_hub.priors import TEST_IMBALANCES  # noqa: E402

EXTREMES = (TEST_IMBALANCES[0], TEST_IMBALANCES[-1])  # 50 and 1/50


def _by_r(extreme, balanced, other):
    """A number per test imbalance: ``extreme`` at 50 and 1/50, ``balanced`` at 1, ``other`` elsewhere."""
    return lambda r: extreme if r in EXTREMES else balanced if r == 1.0 else other


def _fake_deployment(run_dir, base, *, num_experts, selected, oracle_gain, estimate_gap, commit="abc1234"):
    """A finished run folder (``_fake_run``) and its deployment evaluation ``eval_deployment/metrics.json``: per
    model (the ensemble at ``base`` + 5, expert k at ``base`` + k; all the same model when K = 1) and test imbalance
    r, raw top-1 ``base``, oracle ``raw + oracle_gain(r)``; the scored halves' raw and oracle 0.1 above the exact
    ones and the estimated prior ``estimate_gap(r)`` below their oracle."""
    _fake_run(run_dir, base, base)
    (run_dir / "run_info.json").write_text(json.dumps({"history": [], "commit": commit, "selected_expert": selected}))
    models = [("ensemble", 5.0 if num_experts > 1 else 0.0)] + [(f"expert {k}", float(k)) for k in range(num_experts)]
    records = []
    for r in TEST_IMBALANCES:
        for name, offset in models:
            raw, oracle = base + offset, base + offset + oracle_gain(r)
            records += [{"test_imbalance": r, "model": name, "prior": "raw", "adjusted": False, "top1": raw},
                        {"test_imbalance": r, "model": name, "prior": "oracle", "adjusted": True, "top1": oracle}]
    for r in TEST_IMBALANCES:
        for name, offset in models:
            raw, oracle = base + offset + 0.1, base + offset + oracle_gain(r) + 0.1
            records.append({"test_imbalance": r, "model": name, "prior": "estimated", "adjusted": True,
                            "top1": oracle - estimate_gap(r), "top1_std": 0.4, "raw_top1": raw, "oracle_top1": oracle,
                            "prior_l1": 0.05 + offset / 100, "prior_l1_std": 0.01, "draws": 5, "estimated_from": 400,
                            "num_samples": 401, "shrinkage": 0.1})
    rows = [{"nll": 1.0 + offset / 10, "nll_calibrated": 0.8 + offset / 10, "ece": 10.0 + offset,
             "ece_calibrated": 3.0 + offset, "temperature": 1.5} for _, offset in models]  # ensemble, expert 0, ...
    calibration = {"fit_split": "val", "fitted_on": 90, "ensemble": rows[0], "experts": rows[1:]}
    out = run_dir / "eval_deployment"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"selected_expert": selected, "splits": {
        "val": {}, "test": {"prior_shift": records, "calibration": calibration}}}))


def _deployment_study(tmp_path, tiny_data, **extra):
    """``dep``: the deployment study of ``tiny_study`` (bsce_k1, K = 1, and ncl, K = 2; seeds 0 and 1)."""
    _write_study(tmp_path, tiny_data)
    spec = {"name": "dep", "kind": "deployment", "position": 9, "title": "Deploying the tiny models",
            "description": "The tiny study's runs, deployed.", "evaluates": "tiny_study", "methods": ["ncl", "bsce_k1"],
            "findings": "NCL's ensemble gains {{dep:ncl:ensemble:estimated_minus_raw:50}} at 50; its single expert "
                        "scores {{dep:ncl:single:raw:1/50}} raw at 1/50, NLL {{dep:ncl:single:calibration:nll}}.",
            **extra}
    path = tmp_path / "dep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _deployed_runs(study):
    """NCL meets every target (its oracle and estimated gains larger at seed 1); BSCE meets targets 2 and 3 only."""
    for seed in (0, 1):
        _fake_deployment(study.evaluated.run_dir("ncl", seed), 60.0 + 2 * seed, num_experts=2, selected=1 - seed,
                         oracle_gain=_by_r(8.0 + 2 * seed, 0.0, 2.0), estimate_gap=_by_r(0.5, 0.1, 0.2))
        _fake_deployment(study.evaluated.run_dir("bsce_k1", seed), 55.0 + seed, num_experts=1, selected=0,
                         oracle_gain=_by_r(4.0, -0.5, 1.0), estimate_gap=_by_r(0.5, 0.0, 0.0))


def test_deployment_dry_run_lists_evaluations_and_the_runner_skips_done_and_waits(tmp_path, tiny_data, capsys):
    path = _deployment_study(tmp_path, tiny_data)
    study = S.load_study(path)
    assert isinstance(study, S.DeploymentStudy) and [m.name for m in study.methods] == ["ncl", "bsce_k1"]
    run_dir = study.evaluated.run_dir
    _fake_deployment(run_dir("bsce_k1", 0), 55.0, num_experts=1, selected=0, oracle_gain=_by_r(4, 0, 1),
                     estimate_gap=_by_r(0, 0, 0))
    _fake_run(run_dir("ncl", 0), 60.0, 60.0)  # finished, not evaluated
    _fake_run(run_dir("bsce_k1", 1), 56.0, 56.0)
    run_dir("ncl", 1).mkdir(parents=True)  # still training
    assert study_recipe.main(["--config", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    args = "--split val --split test --calibrate-on val --out"
    assert printed == [
        f"[new] python recipes/evaluate.py {run_dir('ncl', 0)} {args} {run_dir('ncl', 0) / 'eval_deployment'}",
        f"[done] python recipes/evaluate.py {run_dir('bsce_k1', 0)} {args} "
        f"{run_dir('bsce_k1', 0) / 'eval_deployment'}",
        f"[waiting] python recipes/evaluate.py {run_dir('ncl', 1)} {args} {run_dir('ncl', 1) / 'eval_deployment'}",
        f"[new] python recipes/evaluate.py {run_dir('bsce_k1', 1)} {args} "
        f"{run_dir('bsce_k1', 1) / 'eval_deployment'}"]
    assert study_recipe.main(["--config", str(path), "--dry-run", "--only", "ncl", "--seeds", "1"]) == 0
    assert capsys.readouterr().out.startswith("[waiting]")

    # the runner starts the new ones only (a stand-in for evaluate.py that writes the metrics it is told to)
    script = tmp_path / "fake_evaluate.py"
    script.write_text("import pathlib, sys\nout = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
                      "out.mkdir()\n(out / 'metrics.json').write_text('{}')\nprint('evaluated', sys.argv[1])\n")
    lines = []
    assert S.run_evaluations(study, jobs=2, threads=1, evaluate_script=script, log=lines.append) == []
    assert lines[:2] == [f"done     {run_dir('bsce_k1', 0) / 'eval_deployment'}",
                         f"waiting  {run_dir('ncl', 1)} (training not finished)"]
    assert sum(line.startswith("started") for line in lines) == 2 == sum(line.startswith("finished") for line in lines)
    for method, seed in (("ncl", 0), ("bsce_k1", 1)):
        assert study.is_evaluated(run_dir(method, seed))
        assert not (run_dir(method, seed) / "eval_deployment.lock").exists()
        log = (run_dir(method, seed) / "eval_deployment.log").read_text()
        assert f"{script} {run_dir(method, seed)} {args}" in log and "evaluated" in log
    assert not (run_dir("bsce_k1", 0) / "eval_deployment.log").exists()  # done before: not evaluated again
    assert not study.is_evaluated(run_dir("ncl", 1))


def test_deployment_record_pairs_the_same_halves_and_takes_the_selected_expert(tmp_path, tiny_data):
    study = S.load_study(_deployment_study(tmp_path, tiny_data))
    _deployed_runs(study)
    record = S.collect_deployment(study)
    assert record["kind"] == "deployment" and record["evaluates"] == "tiny_study" and record["commits"] == ["abc1234"]
    assert record["test_imbalances"] == ["50", "25", "10", "5", "2", "1", "1/2", "1/5", "1/10", "1/25", "1/50"]
    assert list(record["methods"]) == ["ncl", "bsce_k1"] and record["targets"]["min_estimated_minus_raw"] == -0.3
    ncl, bsce = record["methods"]["ncl"], record["methods"]["bsce_k1"]
    # the single model is the expert selected on validation: expert 1 (60 + 1) at seed 0, expert 0 (62 + 0) at seed 1
    assert ncl["runs"]["0"]["models"]["single"]["prior_shift"]["1/50"]["raw"] == 61.0
    single_raw = ncl["summary"]["single/raw/1/50"]
    assert single_raw["values"] == [61.0, 62.0] and single_raw["mean"] == pytest.approx(61.5)
    # estimated minus raw of the same halves, seed by seed: (oracle + 0.1 - 0.5) - (raw + 0.1) = 8 - 0.5 and 10 - 0.5
    paired = ncl["summary"]["ensemble/estimated_minus_raw/50"]
    assert paired["values"] == pytest.approx([7.5, 9.5]) and paired["mean"] == pytest.approx(8.5)
    assert paired["std"] == pytest.approx(2 ** 0.5)
    assert ncl["summary"]["ensemble/estimated_minus_oracle/1"]["values"] == pytest.approx([-0.1, -0.1])
    assert ncl["summary"]["single/oracle_minus_raw/25"]["mean"] == pytest.approx(2.0)
    assert ncl["summary"]["ensemble/calibration/nll"]["mean"] == pytest.approx(1.5)
    assert ncl["summary"]["single/calibration/ece"]["values"] == [11.0, 10.0]  # expert 1, then expert 0
    # K = 1: one model, called single
    assert set(bsce["runs"]["0"]["models"]) == {"single"} and not any(k.startswith("ensemble") for k in bsce["summary"])
    assert bsce["runs"]["1"]["estimation"]["draws"] == 5 and bsce["runs"]["1"]["calibration_fit"]["fitted_on"] == 90


def test_deployment_page_has_its_tables_and_checks_with_pass_or_fail(tmp_path, tiny_data):
    path = _deployment_study(tmp_path, tiny_data)
    study = S.load_study(path)
    _deployed_runs(study)
    results, page = tmp_path / "results", tmp_path / "results.md"
    argv = ["--config", str(path), "--report", "--results-dir", str(results), "--markdown", str(page)]
    assert study_recipe.main(argv) == 0
    text = page.read_text()
    assert "## Deploying the tiny models" in text and "The tiny study's runs, deployed." in text
    assert "each evaluated with `python recipes/evaluate.py RUN --split val --split test --calibrate-on val --out " \
           "RUN/eval_deployment`; calibration fitted on val (90 images)" in text
    single = text[text.index("### Shifted test class mix: the selected single expert"):]
    assert "| method | | 50 | 25 | 10 | 5 | 2 | 1 | 1/2 | 1/5 | 1/10 | 1/25 | 1/50 |" in single
    assert "| NCL K=2 (2 seeds) | raw | 61.50 ± 0.71 |" in single
    assert "| BSCE K=1 (2 seeds) | raw | 55.50 ± 0.71 |" in single
    assert "|  | estimated − raw, same halves | +8.50 ± 1.41 | +1.80 ± 0.00 |" in single
    assert "|  | L1 error of the estimated prior | 0.055 ± 0.007 |" in single
    ensemble = text[text.index("### Shifted test class mix: the ensemble"):text.index("### Calibration")]
    assert "NCL K=2" in ensemble and "BSCE" not in ensemble
    assert "| NCL K=2 (2 seeds) | ensemble | 1.500 ± 0.000 → 1.300 ± 0.000 | 15.00 ± 0.00 → 8.00 ± 0.00 |" in (
        text[text.index("### Calibration"):])
    checks = text[text.index("### Checks"):]
    assert "1. oracle ≥ raw − 0.3 at every r (exact rows);" in checks
    assert "3. estimated ≥ raw + 3 at r = 50 and 1/50;" in checks
    assert "5. estimated within 0.3 of raw at r = 1." in checks
    assert ("| NCL K=2 (2 seeds) | ensemble | +0.00 (r = 1) | -0.50 / -0.50 | +8.50 / +8.50 | -0.10 (r = 1) | -0.10 "
            "| all 5 met |") in checks
    assert ("| BSCE K=1 (2 seeds) | single (K = 1) | -0.50 (r = 1) | -0.50 / -0.50 | +3.50 / +3.50 | -0.50 (r = 1) "
            "| -0.50 | 2 of 5 met; misses 1, 4, 5 |") in checks
    assert ("NCL's ensemble gains +8.50 ± 1.41 at 50; its single expert scores 61.50 ± 0.71 raw at 1/50, NLL "
            "1.050 ± 0.071.") in text
    # targets are data of the study file; the page is regenerated from the record alone
    record = json.loads((results / "dep.json").read_text())
    record["targets"]["min_oracle_minus_raw"] = -1.0
    assert "3 of 5 met; misses 4, 5" in S.render_deployment(record)
    page.unlink()
    assert study_recipe.main(["--report", "--results-dir", str(results), "--markdown", str(page)]) == 0
    assert page.read_text() == text
    with pytest.raises(ValueError, match="dep:ncl:single:nope"):
        S.fill_deployment("{{dep:ncl:single:nope}}", record)


def test_a_deployment_study_without_evaluated_runs_lists_its_methods(tmp_path, tiny_data):
    study = S.load_study(_deployment_study(tmp_path, tiny_data, findings=""))
    record = S.collect_deployment(study)
    assert record["test_imbalances"] == [] and all(not m["runs"] for m in record["methods"].values())
    text = S.render_deployment(record)
    assert text.startswith("## Deploying the tiny models")
    assert "each method has: NCL K=2: 0 of 2; BSCE K=1: 0 of 2." in text
    assert "### Checks" not in text


@pytest.mark.parametrize("extra, message", [
    ({"kind": "deploy"}, "unknown study kind 'deploy'"),
    ({"seeds": [0]}, r"unknown deployment study keys \['seeds'\]"),
    ({"evaluates": "nope"}, "no study file .*nope.yaml"),
    ({"methods": ["ncl", "nope"]}, "study tiny_study has no method 'nope'"),
    ({"evaluate_args": ["--split", "test", "--out", "x"]}, "evaluate_args give --out"),
    ({"out": "a/b"}, "give a folder name"),
    ({"targets": {"min_gain": 1}}, r"unknown targets \['min_gain'\]"),
])
def test_bad_deployment_study_files_are_refused(tmp_path, tiny_data, extra, message):
    with pytest.raises(ConfigError, match=message):
        S.load_study(_deployment_study(tmp_path, tiny_data, **extra))


def test_a_deployment_study_evaluates_only_methods_its_study_trains(tmp_path, tiny_data):
    _schedule_study(tmp_path, tiny_data)  # tiny_study.yaml: the schedule study sched
    path = tmp_path / "dep.yaml"
    path.write_text(yaml.safe_dump({"name": "dep", "kind": "deployment", "evaluates": "tiny_study",
                                    "methods": ["ncl_e4", "bsce_e2"]}))
    with pytest.raises(ConfigError, match="bsce_e2 of study sched takes its runs from src/bsce_k1"):
        S.load_study(path)
    path.write_text(yaml.safe_dump({"name": "dep", "kind": "deployment", "evaluates": "tiny_study",
                                    "methods": ["ncl_e4"]}))
    study = S.load_study(path)
    assert [(m.name, s) for m, s, _ in study.evaluations()] == [("ncl_e4", 0)]
    assert study.evaluated.run_dir("ncl_e4", 0) == tmp_path / "sched_runs" / "ncl_e4" / "seed_0"
    _fake_deployment(study.evaluated.run_dir("ncl_e4", 0), 50.0, num_experts=2, selected=0,
                     oracle_gain=_by_r(4, 0, 1), estimate_gap=_by_r(0, 0, 0))
    assert S.collect_deployment(study)["methods"]["ncl_e4"]["label"] == "NCL, 4 epochs"


def test_records_name_files_inside_the_checkout_relative_to_it():
    # an absolute --config inside the checkout is recorded as the repo-relative path, as a relative one is
    absolute = S.load_study(REPO / "recipes" / "studies" / "deployment_small.yaml")
    record = S.collect_deployment(absolute)
    assert record["study_file"] == "recipes/studies/deployment_small.yaml"
    assert record["evaluates_file"] == "recipes/studies/schedule_small.yaml"
    training = S.collect(S.load_study(REPO / "recipes" / "studies" / "schedule_small.yaml"), REPO / "docs" / "results")
    assert training["study_file"] == "recipes/studies/schedule_small.yaml"
    assert training["config"] == "recipes/configs/cifar10_lt_if100.yaml"
