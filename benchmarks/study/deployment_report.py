"""Report a deployment study: its record (:mod:`.deployment`) turned into its section of ``docs/results.md``: per
model a table of test top-1 against the test imbalance (raw, oracle, estimated prior and the paired differences),
the calibration table, the checks of the study's targets, the findings.

The checks are computed here from the means over seeds (unrounded), per method and model, against the record's
``targets`` (the study file's, else :data:`.study.DEFAULT_TARGETS`). Findings may quote any summary number as
``{{dep:METHOD:KEY}}`` with KEY a summary key of :mod:`.deployment` written with ``:`` or ``/``
(``{{dep:ncl_paper_e60:single:estimated:50}}``, ``{{dep:ncl_paper_e60:ensemble:calibration:nll_calibrated}}``): it
becomes mean ± std over seeds (differences signed, the L1 error and NLL with three decimals).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from .stats import _fmt

_MODEL_NAMES = {"single": "the selected single expert", "ensemble": "the ensemble of the experts"}
_SHIFT_TEXT = {
    "single": "Test top-1 (%) of the selected single expert by test imbalance r (largest over smallest class share, "
              "classes in training order: 50 follows the training long tail, 1 is balanced, 1/50 reverses it). *raw*: "
              "the model as deployed (argmax of its raw logits); *oracle*: its calibrated logits plus the log of the "
              "true test prior; both exact (per-class accuracy weighted by the test prior). *estimated*: the prior "
              "estimated by EM on one half of each resampled test subset without its labels, the other half scored "
              "(mean over the draws); the differences to raw and oracle are paired on the same scored halves "
              "(points). *L1 error*: sum over classes of |estimated − true prior| (0 to 2). Cells: mean ± standard "
              "deviation over seeds; a method with one seed shows its value.",
    "ensemble": "The same for the ensemble of the experts (the mean of their logits, calibrated as one model). "
                "Methods with one expert are in the table above only: their ensemble is that expert.",
}
# table rows: summary quantity, row name, signed, decimals
_SHIFT_ROWS = (("raw", "raw", False, 2), ("oracle", "oracle", False, 2), ("estimated", "estimated", False, 2),
               ("estimated_minus_raw", "estimated − raw, same halves", True, 2),
               ("estimated_minus_oracle", "estimated − oracle, same halves", True, 2),
               ("prior_l1", "L1 error of the estimated prior", False, 3))


def render_deployment(record: Dict[str, Any]) -> str:
    """The markdown section of one deployment study record."""
    lines = _render_setting(record)
    for model in ("single", "ensemble"):
        lines += _render_shift(record, model)
    lines += _render_calibration(record)
    lines += _render_checks(record)
    if record.get("findings"):
        lines += ["### What the numbers say", "", fill_deployment(record["findings"], record), ""]
    return "\n".join(lines)


def _cell(stat: Optional[Dict[str, Any]], signed: bool = False, digits: int = 2) -> str:
    """A table cell: mean ± std over seeds, or the value of a single seed (the row's label gives the seeds)."""
    if stat and stat["n"] == 1:
        return f"{stat['mean']:{'+' if signed else ''}.{digits}f}"
    return _fmt(stat, False, signed, digits)


def _model_name(m: Dict[str, Any], model: str) -> str:
    """``single``, ``ensemble``, or ``single (K = 1)`` for a method of one expert (as the training tables say)."""
    k1 = bool(m["runs"]) and all(r["num_experts"] == 1 for r in m["runs"].values())
    return "single (K = 1)" if k1 else model


def _method_label(m: Dict[str, Any]) -> str:
    n = len(m["runs"])
    return f"{m['label']} ({n} seed{'' if n == 1 else 's'})"


def _render_setting(record: Dict[str, Any]) -> List[str]:
    args = " ".join(record["evaluate_args"])
    fits = sorted({(r["calibration_fit"]["fit_split"], r["calibration_fit"]["fitted_on"]) for r in _runs(record)
                   if r.get("calibration_fit")}, key=str)
    draws = sorted({r["estimation"]["draws"] for r in _runs(record)}, key=str)
    lines = [f"## {record['title']}", "", fill_deployment(record["description"], record), ""]
    return lines + [
        f"The runs of study `{record['evaluates']}` (`{record.get('evaluates_file')}`), each evaluated with "
        f"`python recipes/evaluate.py RUN {args} --out RUN/{record['out']}`; calibration fitted on "
        f"{', '.join(f'{s} ({n} images)' for s, n in fits) or 'no split'}; the prior estimated over "
        f"{', '.join(map(str, draws)) or 'no'} draw(s) per test imbalance. Study file `{record.get('study_file')}`; "
        f"the runs trained at commit(s) {', '.join(record['commits']) or 'unknown'}. Runs evaluated, of the seeds "
        "each method has: " + "; ".join(f"{m['label']}: {len(m['runs'])} of {len(m['seeds'])}"
                                        for m in record["methods"].values()) + ".", ""]


def _runs(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [r for m in record["methods"].values() for r in m["runs"].values()]


def _render_shift(record: Dict[str, Any], model: str) -> List[str]:
    """Test top-1 of ``model`` against the test imbalance: one row per method and quantity of :data:`_SHIFT_ROWS`."""
    rs = record["test_imbalances"]
    if not rs:
        return []
    methods = [m for m in record["methods"].values() if not m["runs"] or f"{model}/raw/{rs[0]}" in m["summary"]]
    if model == "ensemble":  # K = 1 methods have no ensemble of their own; methods without runs are listed once
        methods = [m for m in methods if m["runs"]]
    if not methods:
        return []
    lines = [f"### Shifted test class mix: {_MODEL_NAMES[model]}", "", _SHIFT_TEXT[model], "",
             "| method | | " + " | ".join(rs) + " |", "|---|---|" + "---:|" * len(rs)]
    for m in methods:
        if not m["runs"]:
            lines.append(f"| {_method_label(m)} | no evaluated run yet |" + " |" * len(rs))
            continue
        for i, (quantity, name, signed, digits) in enumerate(_SHIFT_ROWS):
            cells = [_cell(m["summary"].get(f"{model}/{quantity}/{r}"), signed, digits) for r in rs]
            lines.append(f"| {_method_label(m) if i == 0 else ''} | {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _render_calibration(record: Dict[str, Any]) -> List[str]:
    rows = []
    for m in record["methods"].values():
        for model in ("single", "ensemble"):
            cal = {k.rsplit("/", 1)[1]: v for k, v in m["summary"].items() if k.startswith(f"{model}/calibration/")}
            if not cal.get("nll", {}).get("n"):
                continue
            rows.append(f"| {_method_label(m)} | {_model_name(m, model)} | {_cell(cal['nll'], digits=3)} → "
                        f"{_cell(cal['nll_calibrated'], digits=3)} | {_cell(cal['ece'])} → "
                        f"{_cell(cal['ece_calibrated'])} | {_cell(cal['temperature'])} |")
    if not rows:
        return []
    return ["### Calibration", "",
            "Negative log-likelihood (nats) and expected calibration error (%) on the test split, before → after "
            "the bias-corrected temperature scaling fitted on the calibration split; T: its temperature. Mean ± "
            "standard deviation over seeds; a method with one seed shows its value.", "",
            "| method | model | NLL before → after | ECE before → after | T |", "|---|---|---:|---:|---:|",
            *rows, ""]


_EPS = 1e-9  # a mean on a target's boundary meets it despite float rounding


def _targets_text(t: Dict[str, float], hi: str, lo: str) -> List[str]:
    """The five targets in words, in the order of :func:`_checks`."""
    def raw(offset: float) -> str:
        return f"raw {'+' if offset >= 0 else '−'} {abs(offset):g}"

    return [f"oracle ≥ {raw(t['min_oracle_minus_raw'])} at every r (exact rows)",
            f"estimated within {t['max_abs_estimated_minus_oracle_at_extremes']:g} of oracle at r = {hi} and {lo}",
            f"estimated ≥ {raw(t['min_estimated_minus_raw_at_extremes'])} at r = {hi} and {lo}",
            f"estimated ≥ {raw(t['min_estimated_minus_raw'])} at every r",
            f"estimated within {t['max_abs_estimated_minus_raw_at_balanced']:g} of raw at r = 1"]


def _checks(summary: Dict[str, Any], model: str, rs: List[str], t: Dict[str, float]
            ) -> List[Tuple[str, Optional[bool]]]:
    """The five checks of one method and model, as :func:`_targets_text` orders them: (cell, whether the target is
    met; None when a number is missing). Numbers are means over seeds; estimated ones are paired (same halves)."""
    def mean(quantity: str, r: str) -> Optional[float]:
        return (summary.get(f"{model}/{quantity}/{r}") or {}).get("mean")

    def lowest(quantity: str) -> Tuple[str, Optional[float]]:
        values = [(mean(quantity, r), r) for r in rs if mean(quantity, r) is not None]
        if not values:
            return "n/a", None
        v, r = min(values, key=lambda x: x[0])
        return f"{v:+.2f} (r = {r})", v

    def both(quantity: str) -> Tuple[str, List[Optional[float]]]:
        values = [mean(quantity, r) for r in (rs[0], rs[-1])]
        return " / ".join("n/a" if v is None else f"{v:+.2f}" for v in values), values

    def met(values: List[Optional[float]], ok) -> Optional[bool]:
        return None if any(v is None for v in values) else all(ok(v) for v in values)

    (c1, v1), (c2, v2), (c3, v3), (c4, v4) = (lowest("oracle_minus_raw"), both("estimated_minus_oracle"),
                                              both("estimated_minus_raw"), lowest("estimated_minus_raw"))
    v5 = mean("estimated_minus_raw", "1")
    return [(c1, met([v1], lambda v: v >= t["min_oracle_minus_raw"] - _EPS)),
            (c2, met(v2, lambda v: abs(v) <= t["max_abs_estimated_minus_oracle_at_extremes"] + _EPS)),
            (c3, met(v3, lambda v: v >= t["min_estimated_minus_raw_at_extremes"] - _EPS)),
            (c4, met([v4], lambda v: v >= t["min_estimated_minus_raw"] - _EPS)),
            ("n/a" if v5 is None else f"{v5:+.2f}",
             met([v5], lambda v: abs(v) <= t["max_abs_estimated_minus_raw_at_balanced"] + _EPS))]


def _verdict(checks: List[Tuple[str, Optional[bool]]]) -> str:
    """``all 5 met``, or how many are met and which are missed or cannot be checked (target numbers)."""
    missed = [str(i) for i, (_, ok) in enumerate(checks, 1) if ok is False]
    unknown = [str(i) for i, (_, ok) in enumerate(checks, 1) if ok is None]
    if not missed and not unknown:
        return f"all {len(checks)} met"
    text = f"{sum(ok is True for _, ok in checks)} of {len(checks)} met"
    return text + (f"; misses {', '.join(missed)}" if missed else "") + (
        f"; no number for {', '.join(unknown)}" if unknown else "")


def _render_checks(record: Dict[str, Any]) -> List[str]:
    rs = record["test_imbalances"]
    if not rs:
        return []
    hi, lo = rs[0], rs[-1]
    rows = []
    for m in record["methods"].values():
        for model in ("single", "ensemble"):
            if f"{model}/raw/{hi}" in m["summary"]:
                checks = _checks(m["summary"], model, rs, record["targets"])
                rows.append(f"| {_method_label(m)} | {_model_name(m, model)} | " + " | ".join(c for c, _ in checks)
                            + f" | {_verdict(checks)} |")
    if not rows:
        return []
    targets = [f"{i}. {text};" for i, text in enumerate(_targets_text(record["targets"], hi, lo), 1)]
    return ["### Checks", "",
            "Computed from the tables above: per method and model, from the means over seeds (unrounded), test top-1 "
            "points; the estimated rows compare the same scored halves. The targets (the study file's `targets`, else "
            "the defaults of `benchmarks/study/study.py`):",
            "", *targets[:-1], targets[-1].rstrip(";") + ".", "",
            f"| method | model | 1: oracle − raw, lowest | 2: estimated − oracle at {hi} / {lo} | 3: estimated − "
            f"raw at {hi} / {lo} | 4: estimated − raw, lowest | 5: estimated − raw at 1 | targets |",
            "|---|---|---:|---:|---:|---:|---:|---|", *rows, ""]


def fill_deployment(text: str, record: Dict[str, Any]) -> str:
    """Replace ``{{dep:METHOD:KEY}}`` (module docstring) with that summary number's mean ± std over seeds."""

    def value(match: "re.Match[str]") -> str:
        parts = match.group(1).split(":")
        try:
            if parts[0] != "dep" or len(parts) < 3:
                raise KeyError(parts[0])
            key = "/".join(parts[2:])
            stat = record["methods"][parts[1]]["summary"][key]
        except KeyError:
            raise ValueError(f"study text refers to {match.group(0)}, which the record does not have; write "
                             "{{dep:METHOD:MODEL:QUANTITY:R}} or {{dep:METHOD:MODEL:calibration:FIELD}}") from None
        digits = 3 if "prior_l1" in key or "nll" in key else 2
        return _fmt(stat, False, signed="_minus_" in key, digits=digits)

    return re.sub(r"\{\{([^}]+)\}\}", value, text)
