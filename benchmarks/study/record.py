"""Collect a study: its finished run folders (and the runs it takes from other studies' records) read into one
JSON-ready record: per method and seed the run's numbers; per method the mean and sample standard deviation over
seeds; paired differences to the baseline."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ncl_hub.config import ConfigError, parse_args

from .stats import _stats
from .study import REPO, Method, Study, cli_args, is_finished, repo_relative

METRIC_KEYS = ("top1", "many", "medium", "few")  # a run's summary keys: top-1 and ncl_hub.evaluate.GROUPS


def _run_record(run_dir: Path) -> Dict[str, Any]:
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    selected = metrics.get("selected_expert", info.get("selected_expert", 0))
    splits = {}
    for split, m in metrics["splits"].items():
        single = m["experts"][selected] if m.get("experts") else m["ensemble"]
        per_class = m.get("per_class_accuracy") or {}
        splits[split] = {"single": {g: single.get(g) for g in METRIC_KEYS},
                         "ensemble": {g: m["ensemble"].get(g) for g in METRIC_KEYS},
                         "per_class_single": per_class["experts"][selected] if per_class.get("experts") else None,
                         "per_class_ensemble": per_class.get("ensemble"),
                         "pairwise_kl": m.get("pairwise_kl")}
    history = [{k: h.get(k) for k in ("epoch", "step", "lr", "train_loss", "train_nil_all", "train_nil_hard",
                                       "train_nbod_all", "train_nbod_hard", "train_ce", "val_top1",
                                       "val_expert_top1") if k in h} for h in info.get("history", [])]
    return {"splits": splits, "selected_expert": selected, "best_epoch": info.get("best_epoch"),
            "wall_time_s": info.get("wall_time_s"), "train_time_s": _train_time(info), "commit": info.get("commit"),
            "class_counts": info.get("class_counts"), "history": history}


def _train_time(info: Dict[str, Any]) -> Optional[float]:
    """Seconds spent in the training epochs, summed over every process that trained the run: unlike the last
    process's wall time, this counts the epochs before a kill and resume."""
    times = [h.get("time_s") for h in info.get("history", [])]
    return round(sum(times), 1) if times and all(t is not None for t in times) else None


def _summary(runs: Dict[str, Any]) -> Dict[str, Any]:
    """Mean and sample standard deviation over a method's runs (``{seed: run record}``) of every number shown."""
    summary: Dict[str, Any] = {}
    for split in ("val", "test"):
        for model in ("single", "ensemble"):
            for g in METRIC_KEYS:
                vals = [r["splits"].get(split, {}).get(model, {}).get(g) for r in runs.values()]
                if any(v is not None for v in vals):
                    summary[f"{split}/{model}/{g}"] = _stats(vals)
    summary["wall_time_s"] = _stats([r["wall_time_s"] for r in runs.values()])
    summary["train_time_s"] = _stats([r.get("train_time_s") for r in runs.values()])
    summary["test/pairwise_kl"] = _stats([r["splits"].get("test", {}).get("pairwise_kl") for r in runs.values()])
    for model in ("single", "ensemble"):
        rows = [r["splits"].get("test", {}).get(f"per_class_{model}") for r in runs.values()]
        rows = [row for row in rows if row]
        if rows:
            summary[f"test/per_class_{model}"] = [
                sum(row[c] for row in rows if row[c] is not None) / max(1, sum(row[c] is not None for row in rows))
                for c in range(len(rows[0]))]
    return summary


def collect(study: Study, records_dir: Path = REPO / "docs" / "results") -> Dict[str, Any]:
    """Read every finished run of ``study`` into one record: per method and seed the run's numbers, and per method
    mean and sample standard deviation over seeds; paired differences to the baseline (same seeds). Methods with
    ``from`` take their runs from ``records_dir/STUDY.json``."""
    methods = {m.name: _method_entry(study, m, Path(records_dir)) for m in study.methods}
    record = {"name": study.name, "position": study.position,
              "title": study.title, "description": study.description, "findings": study.findings,
              "study_file": repo_relative(study.source),
              "config": repo_relative(study.config),
              "common": study.common, "seeds": study.seeds, "baseline": study.baseline, "methods": methods,
              "commits": sorted({r["commit"] for m in methods.values() for r in m["runs"].values() if r["commit"]})}
    if study.series:
        record["series"] = study.series
        _check_series(methods)
    if study.baseline_series():
        record["differences"] = _series_differences(methods, study.baseline_series())
    elif study.baseline:
        record["differences"] = _differences(methods, study.baseline)
    return record


def _method_entry(study: Study, method: Method, records_dir: Path) -> Dict[str, Any]:
    """One method of the record: its finished runs (trained here, or taken from another record) and their summary;
    its series and epochs in a study with series, its seeds where it has its own."""
    seeds = study.seeds_of(method)
    if method.taken_from is None:
        runs = {str(s): _run_record(study.run_dir(method.name, s)) for s in seeds
                if is_finished(study.run_dir(method.name, s))}
        entry = {"label": method.label, "overrides": method.overrides, "runs": runs, "summary": _summary(runs)}
        epochs = method.epochs
    else:
        source, src = read_source(method, records_dir)
        runs = {s: r for s, r in src["runs"].items() if int(s) in seeds}
        entry = {"label": method.label, "from": method.taken_from, "common": source["common"],
                 "overrides": src["overrides"], "runs": runs, "summary": _summary(runs)}
        epochs = _source_epochs(source, src)
    if study.series:
        entry.update(series=method.series, epochs=epochs)
    if method.seeds is not None:
        entry["seeds"] = seeds
    return entry


def read_source(method: Method, records_dir: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The record, and its method entry, that ``method`` takes its runs from (``from: STUDY/METHOD``)."""
    study_name, name = method.taken_from.split("/")
    path = Path(records_dir) / f"{study_name}.json"
    if not path.is_file():
        raise ConfigError(f"method {method.name} takes its runs from {method.taken_from}, but there is no record "
                          f"{path}. Collect study {study_name} into that folder first, or fix its `from`")
    record = json.loads(path.read_text())
    if name not in record["methods"]:
        raise ConfigError(f"method {method.name} takes its runs from {method.taken_from}, but the record {path} has "
                          f"no method {name}; its methods are {', '.join(record['methods'])}")
    return record, record["methods"][name]


def _source_epochs(source: Dict[str, Any], src: Dict[str, Any]) -> int:
    """The epochs of a method of another record: its ``common`` and the method's ``overrides``, else its config."""
    settings = {**source.get("common", {}), **src.get("overrides", {})}
    if "epochs" in settings:
        return int(settings["epochs"])
    return parse_args(["--config", str(REPO / source["config"]), *cli_args(settings)]).epochs


def _check_series(methods: Dict[str, Any]) -> None:
    """One method per series and schedule length: the schedule table and the pairing need it."""
    seen: Dict[Tuple[str, int], str] = {}
    for name, m in methods.items():
        if m.get("series") is None:
            continue
        key = (m["series"], m["epochs"])
        if key in seen:
            raise ConfigError(f"methods {seen[key]} and {name} are both series {key[0]} at {key[1]} epochs; give one "
                              "another series or schedule length")
        seen[key] = name


def _differences(methods: Dict[str, Any], baseline: str) -> Dict[str, Any]:
    base = methods[baseline]["runs"]
    return {name: _paired(m["runs"], base) for name, m in methods.items() if name != baseline}


def _series_differences(methods: Dict[str, Any], series: str) -> Dict[str, Any]:
    """Each method not in the baseline ``series`` paired with that series' method of the same epochs."""
    base_at = {m["epochs"]: name for name, m in methods.items() if m.get("series") == series}
    out = {}
    for name, m in methods.items():
        if m.get("series") == series:
            continue
        base = base_at.get(m["epochs"])
        if base is None:
            raise ConfigError(f"method {name} trains {m['epochs']} epochs, but the baseline series {series} has no "
                              f"method of {m['epochs']} epochs (it has {sorted(base_at)}); add one")
        out[name] = {**_paired(m["runs"], methods[base]["runs"]), "baseline": base}
    return out


def _paired(runs: Dict[str, Any], base: Dict[str, Any]) -> Dict[str, Any]:
    """Test differences (single and ensemble, every group) of ``runs`` to the single model of ``base`` runs of the
    same seeds, in points."""
    seeds = sorted(set(runs) & set(base), key=int)
    diff = {}
    for model in ("single", "ensemble"):
        for g in METRIC_KEYS:
            vals = []
            for s in seeds:
                a = runs[s]["splits"].get("test", {}).get(model, {}).get(g)
                b = base[s]["splits"].get("test", {}).get("single", {}).get(g)
                vals.append(None if a is None or b is None else a - b)
            if any(v is not None for v in vals):
                diff[f"test/{model}/{g}"] = _stats(vals)
    return {"seeds": [int(s) for s in seeds], "vs_baseline_single": diff}


def schedule_grid(record: Dict[str, Any]) -> Tuple[List[int], Dict[str, Dict[int, str]]]:
    """The schedule lengths of a record with series, and per series (in the study's order) the method trained
    for each: ``([30, 100], {"bsce_k1": {30: "bsce_k1_e30", 100: "bsce_k1_e100"}, ...})``."""
    grid: Dict[str, Dict[int, str]] = {}
    for name, m in record["methods"].items():
        if m.get("series") is not None:
            grid.setdefault(m["series"], {})[m["epochs"]] = name
    epochs = sorted({e for row in grid.values() for e in row})
    return epochs, {s: dict(sorted(grid[s].items())) for s in record.get("series", {}) if s in grid}

