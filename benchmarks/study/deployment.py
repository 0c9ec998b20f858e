"""Collect a deployment study: the deployment evaluations (``RUN/<out>/metrics.json``) of another study's runs read
into one JSON-ready record. Per method, seed and model (the selected single expert, and the ensemble when K > 1):
test top-1 under each test imbalance r, raw and oracle (exact), with the estimated prior (mean over the draws) and
the raw and oracle top-1 of the same scored halves, the estimated prior's L1 error, and the calibration on the test
split; per method the mean and sample standard deviation over seeds of each number and of the paired differences.

Summary keys: ``MODEL/QUANTITY/R`` (``single/estimated/1/50``; R as :func:`ncl_hub.priors.format_imbalance` writes
it) for the quantities of :data:`PRIOR_FIELDS` and :data:`DIFFERENCES`, ``MODEL/calibration/FIELD`` for
:data:`CALIBRATION_FIELDS`.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from ncl_hub.config import ConfigError
from ncl_hub.evaluate.report import prior_kind
from ncl_hub.priors import format_imbalance

from .stats import _stats
from .study import DeploymentStudy, Method, is_finished, repo_relative

MODELS = ("single", "ensemble")
# per r: top-1 (%) raw and oracle (exact); with the estimated prior, its spread over draws, and the raw and oracle
# top-1 of the same scored halves; the L1 error of the estimated prior (0 to 2) and its spread over draws
PRIOR_FIELDS = ("raw", "oracle", "estimated", "estimated_std", "paired_raw", "paired_oracle", "prior_l1",
                "prior_l1_std")
_ESTIMATED = {"estimated": "top1", "estimated_std": "top1_std", "paired_raw": "raw_top1",
              "paired_oracle": "oracle_top1", "prior_l1": "prior_l1", "prior_l1_std": "prior_l1_std"}
DIFFERENCES = {"oracle_minus_raw": ("oracle", "raw"),  # exact rows
               "estimated_minus_raw": ("estimated", "paired_raw"),  # the same scored halves
               "estimated_minus_oracle": ("estimated", "paired_oracle")}
CALIBRATION_FIELDS = ("nll", "nll_calibrated", "ece", "ece_calibrated", "temperature")  # nats, nats, %, %, T


def collect_deployment(study: DeploymentStudy) -> Dict[str, Any]:
    """The record of ``study``: every evaluated run (training finished, ``RUN/<out>/metrics.json`` written) of its
    methods, per method the mean and sample standard deviation over seeds."""
    methods = {m.name: _method_entry(study, m) for m in study.methods}
    runs = [r for m in methods.values() for r in m["runs"].values()]
    evaluated = study.evaluated
    return {"name": study.name, "kind": "deployment", "position": study.position, "title": study.title,
            "description": study.description, "findings": study.findings,
            "study_file": repo_relative(study.source), "evaluates": evaluated.name,
            "evaluates_file": repo_relative(evaluated.source),
            "evaluate_args": study.evaluate_args, "out": study.out, "seeds": evaluated.seeds,
            "test_imbalances": _imbalances(k for r in runs for m in r["models"].values() for k in m["prior_shift"]),
            "targets": study.targets, "methods": methods,
            "commits": sorted({r["commit"] for r in runs if r["commit"]})}


def _method_entry(study: DeploymentStudy, method: Method) -> Dict[str, Any]:
    seeds = study.evaluated.seeds_of(method)
    runs = {}
    for seed in seeds:
        run_dir = study.evaluated.run_dir(method.name, seed)
        if is_finished(run_dir) and study.is_evaluated(run_dir):
            runs[str(seed)] = _run_record(run_dir, study.out_dir(run_dir) / "metrics.json")
    label = method.label
    if study.evaluated.series and method.epochs is not None:  # the evaluated study's labels name a family
        label = f"{label}, {method.epochs} epochs"
    return {"label": label, "seeds": seeds, "runs": runs, "summary": _summary(runs)}


def _run_record(run_dir: Path, metrics_path: Path) -> Dict[str, Any]:
    """One run's deployment numbers: per model its prior-shift rows and calibration row; where the calibration was
    fitted; the estimation's draws, shrinkage and half sizes per r."""
    metrics = json.loads(metrics_path.read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    test = metrics.get("splits", {}).get("test") or {}
    records = sorted(test.get("prior_shift") or [], key=lambda rec: -rec["test_imbalance"])
    if not any(prior_kind(rec) == "estimated" for rec in records):
        raise ConfigError(f"{metrics_path} has no estimated-prior numbers of the test split. Check the study's "
                          f"evaluate_args (--split test), delete {metrics_path.parent} and run the study again")
    num_experts = len({rec["model"] for rec in records} - {"ensemble"})
    selected = metrics.get("selected_expert")
    selected = int(info.get("selected_expert", 0) if selected is None else selected)
    names = {"single": f"expert {selected}", **({"ensemble": "ensemble"} if num_experts > 1 else {})}
    calibration = test.get("calibration")
    models = {model: {"prior_shift": _prior_rows(records, name),
                      "calibration": _calibration_row(calibration, name, selected)} for model, name in names.items()}
    fit = {k: calibration.get(k) for k in ("fit_split", "fitted_on")} if calibration else None
    return {"commit": info.get("commit"), "selected_expert": selected, "num_experts": num_experts,
            "calibration_fit": fit, "estimation": _estimation(records), "models": models}


def _prior_rows(records: List[Dict[str, Any]], name: str) -> Dict[str, Dict[str, Optional[float]]]:
    """``{r: {field: value}}`` of :data:`PRIOR_FIELDS` for model ``name`` ("ensemble", "expert k")."""
    rows: Dict[str, Dict[str, Optional[float]]] = {}
    for rec in records:
        if rec["model"] != name:
            continue
        row = rows.setdefault(format_imbalance(rec["test_imbalance"]), {})
        kind = prior_kind(rec)
        if kind == "estimated":
            row.update({field: rec.get(key) for field, key in _ESTIMATED.items()})
        else:
            row[kind] = rec["top1"]
    return rows


def _calibration_row(calibration: Optional[Dict[str, Any]], name: str, selected: int) -> Optional[Dict[str, Any]]:
    if not calibration:
        return None
    row = calibration["ensemble"] if name == "ensemble" else (calibration.get("experts") or [{}])[selected]
    return {field: row.get(field) for field in CALIBRATION_FIELDS}


def _estimation(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """How the prior was estimated: draws and shrinkage, and per r the images it was estimated from and scored on."""
    estimated = [rec for rec in records if prior_kind(rec) == "estimated"]
    return {"draws": estimated[0].get("draws"), "shrinkage": estimated[0].get("shrinkage"),
            "estimated_from": {format_imbalance(r["test_imbalance"]): r.get("estimated_from") for r in estimated},
            "num_samples": {format_imbalance(r["test_imbalance"]): r.get("num_samples") for r in estimated}}


def _imbalances(keys: Iterable[str]) -> List[str]:
    """Test imbalances as written (``"50"``, ``"1/50"``), largest first, each once."""
    return sorted(set(keys), key=lambda r: -Fraction(r))


def _summary(runs: Dict[str, Any]) -> Dict[str, Any]:
    """Mean and sample standard deviation over a method's runs (``{seed: run record}``) of every number, and of the
    paired :data:`DIFFERENCES` seed by seed."""
    summary: Dict[str, Any] = {}
    for model in MODELS:
        per_run = [r["models"].get(model) for r in runs.values()]
        if not any(per_run):
            continue
        for r in _imbalances(k for m in per_run if m for k in m["prior_shift"]):
            rows = [(m or {}).get("prior_shift", {}).get(r, {}) for m in per_run]
            for field in PRIOR_FIELDS:
                summary[f"{model}/{field}/{r}"] = _stats([row.get(field) for row in rows])
            for name, (a, b) in DIFFERENCES.items():
                summary[f"{model}/{name}/{r}"] = _stats([None if row.get(a) is None or row.get(b) is None
                                                         else row[a] - row[b] for row in rows])
        for field in CALIBRATION_FIELDS:
            summary[f"{model}/calibration/{field}"] = _stats([((m or {}).get("calibration") or {}).get(field)
                                                              for m in per_run])
    return summary
