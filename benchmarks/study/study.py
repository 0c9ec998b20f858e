"""A study file: what it trains, the runs that follow from it, and each run's ``recipes/train.py`` command line.

A study file (YAML) names a base training config, overrides common to every run, the methods (each a set of
overrides) and the seeds::

    name: cifar10_lt_cpu
    title: CIFAR-10-LT IF 100, 20 epochs on a 2-core CPU
    description: what the study asks (markdown, shown above its tables; no hand-typed results)
    config: ../configs/cifar10_lt_if100.yaml     # relative to the study file
    output_root: outputs/studies/cifar10_lt_cpu  # relative to the working directory
    seeds: [0, 1, 2]
    common: {epochs: 20, moco.enabled: false}
    methods:
      bsce_k1: {label: "BSCE, 1 x ResNet-32", overrides: {loss.name: bsce, model.num_experts: 1}}
      ncl_paper: {label: "NCL (paper), 3 x ResNet-32", overrides: {loss.variant: paper}}
    baseline: bsce_k1          # differences are reported against it, paired by seed
    findings: |                # optional prose under the tables; {{ncl_paper:test/single/top1}} is replaced by
      ...                      # that summary's mean ± std, {{diff:ncl_paper:test/single/top1}} by the paired
                               # difference to the baseline, so no number in it is typed by hand
    position: 1                # optional: the study's place on docs/results.md (then by name)

A method takes ``label``, ``overrides`` and, optionally:

- ``seeds: [0]``: the seeds it runs, a subset of the study's (default: all of them);
- ``from: STUDY/METHOD``: its runs are the runs of METHOD in the record ``<results-dir>/STUDY.json``, read when
  the study is collected; it is never trained by this study and has no ``overrides`` (its epochs and settings are
  that record's ``common`` and the method's ``overrides``); a missing record or method is an error;
- ``series: NAME``: the family it belongs to, one of the study's ``series``.

A study with series (schedule-length studies: one method per family and schedule length) maps each series to its
label, and its ``baseline`` may name a series instead of a method::

    series: {bsce_k1: "BSCE, 1 x ResNet-32", ncl_paper: "NCL paper"}
    methods:
      bsce_k1_e30: {label: "BSCE, 1 x ResNet-32", series: bsce_k1, from: diagnose_small/bsce_k1}
      bsce_k1_e100: {label: "BSCE, 1 x ResNet-32", series: bsce_k1, seeds: [0], overrides: {epochs: 100, ...}}
      ncl_paper_e100: {label: "NCL paper", series: ncl_paper, seeds: [0], overrides: {epochs: 100, ...}}
    baseline: bsce_k1          # each method is paired with the baseline series' method of the same epochs

A method's epochs are its resolved config's ``epochs``. Paired differences are test top-1, single model and ensemble,
minus the baseline's single model at the same seeds; a baseline that names a method pairs every method with it. A
study whose baseline is a series also gets a schedule-length table on the results page (per series and length: the
paired differences and the validation top-1) and the figure ``docs/results/<name>_schedule.png`` (needs the
``plots`` extra), and its tables add the epochs to each label.

Each trained run is ``recipes/train.py`` in a subprocess, its folder ``<output_root>/<method>/seed_<n>``. Unknown
keys are errors.

A study file with ``kind: deployment`` trains nothing: it evaluates the finished runs of another study for
deployment where the test class mix is unknown (``recipes/evaluate.py`` on each run, calibration fitted on a
labelled split, the test split resampled to shifted class priors; :mod:`.deployment` collects the results and
:mod:`.deployment_report` shows them)::

    name: deployment_cifar10_lt
    kind: deployment           # default: training (the format above)
    title: ...                 # as above; also description, findings, position
    evaluates: schedule_cifar10_lt   # a study file of the same folder, without .yaml: its output_root, methods
                                     # and seeds give the run folders; it must be a training study
    methods: [bsce_k1_e60, ncl_paper_e60]   # methods it trains (not taken with from), in table order
    evaluate_args: ["--split", "val", "--split", "test", "--calibrate-on", "val"]   # the default; every
                               # recipes/evaluate.py argument but the run folder and --out
    out: eval_deployment       # the default: the evaluation's folder inside each run folder (a name, no path)
    targets:                   # optional, the defaults shown; checked on the means over seeds (module
      min_oracle_minus_raw: -0.3                  # .deployment_report): oracle - raw at every r at least this
      max_abs_estimated_minus_oracle_at_extremes: 1.5  # |estimated - oracle| at the largest and smallest r
      min_estimated_minus_raw_at_extremes: 3.0    # estimated - raw at the largest and smallest r at least this
      min_estimated_minus_raw: -0.3               # estimated - raw at every r at least this
      max_abs_estimated_minus_raw_at_balanced: 0.3  # |estimated - raw| at r = 1 at most this

Each evaluation is ``recipes/evaluate.py RUN_DIR <evaluate_args> --out RUN_DIR/<out>`` in a subprocess, its output
appended to ``RUN_DIR/<out>.log``; a run whose ``RUN_DIR/<out>/metrics.json`` exists is done, a run not finished
training is waiting (neither is an error). The estimated and paired numbers (estimated - raw, estimated - oracle)
compare the same scored halves of the resampled test subsets; raw and oracle alone are exact. Its ``findings`` quote
numbers as ``{{dep:METHOD:MODEL:QUANTITY:R}}`` (MODEL single or ensemble; QUANTITY raw, oracle, estimated,
estimated_std, paired_raw, paired_oracle, prior_l1, prior_l1_std, oracle_minus_raw, estimated_minus_raw or
estimated_minus_oracle; R as the tables write it: 50, 1, 1/50) or ``{{dep:METHOD:MODEL:calibration:FIELD}}`` (nll,
nll_calibrated, ece, ece_calibrated, temperature), each replaced by its mean ± std over seeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from ncl_hub.config import ConfigError, parse_args

REPO = Path(__file__).resolve().parents[2]  # the checkout whose recipes/train.py the runs use


def repo_relative(path) -> Optional[str]:
    """``path`` relative to the checkout when it lies inside it (records name files the same from any working
    directory or absolute ``--config``), else as given; None stays None."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


_STUDY_KEYS = {"name", "kind", "title", "description", "findings", "config", "output_root", "seeds", "common",
               "methods", "baseline", "position", "series"}
_METHOD_KEYS = {"label", "overrides", "seeds", "from", "series"}
KINDS = ("training", "deployment")
_DEPLOYMENT_KEYS = {"name", "kind", "title", "description", "findings", "position", "evaluates", "methods",
                    "evaluate_args", "out", "targets"}
DEFAULT_EVALUATE_ARGS = ("--split", "val", "--split", "test", "--calibrate-on", "val")
DEFAULT_TARGETS = {  # the deployment targets (module docstring), in points of test top-1
    "min_oracle_minus_raw": -0.3,
    "max_abs_estimated_minus_oracle_at_extremes": 1.5,
    "min_estimated_minus_raw_at_extremes": 3.0,
    "min_estimated_minus_raw": -0.3,
    "max_abs_estimated_minus_raw_at_balanced": 0.3,
}


@dataclass
class Method:
    name: str
    label: str
    overrides: Dict[str, Any]
    seeds: Optional[List[int]] = None  # the seeds it runs; None: all of the study's
    taken_from: Optional[str] = None  # "STUDY/METHOD": its runs are that record's, never trained here
    series: Optional[str] = None  # its family, a key of the study's series
    epochs: Optional[int] = None  # of its resolved config; None for a taken method until it is collected


@dataclass
class Study:
    name: str
    title: str
    description: str
    config: Path
    output_root: Path
    seeds: List[int]
    common: Dict[str, Any]
    methods: List[Method]
    baseline: Optional[str] = None  # a method, or a series (then each method is paired at its epochs)
    findings: str = ""
    position: Optional[int] = None  # where docs/results.md places the study (lowest first; then by name)
    source: Optional[Path] = None
    extra_args: List[str] = field(default_factory=list)
    series: Dict[str, str] = field(default_factory=dict)  # series name -> label

    def run_dir(self, method: str, seed: int) -> Path:
        return self.output_root / method / f"seed_{seed}"

    def seeds_of(self, method: Method) -> List[int]:
        """The seeds ``method`` has runs at (trained, or taken from its record), in the study's order."""
        return [s for s in self.seeds if method.seeds is None or s in method.seeds]

    def runs(self, only: Optional[Sequence[str]] = None,
             seeds: Optional[Sequence[int]] = None) -> List[Tuple[Method, int]]:
        """Every (method, seed) this study trains, seed-major: an interrupted study has every method at the same
        seeds; methods taken from another record have none. ``only`` and ``seeds`` narrow it to some methods and
        seeds of the study; a name or seed the study lacks is an error."""
        _check_narrowing(self.name, [m.name for m in self.methods], self.seeds, only, seeds)
        return [(m, s) for s in self.seeds for m in self.methods
                if m.taken_from is None and s in self.seeds_of(m) and (not only or m.name in only)
                and (seeds is None or s in seeds)]

    def taken(self, only: Optional[Sequence[str]] = None) -> List[Method]:
        """The methods whose runs are taken from another study's record (``from``), narrowed to ``only``."""
        return [m for m in self.methods if m.taken_from is not None and (not only or m.name in only)]

    def baseline_series(self) -> Optional[str]:
        """The series the baseline names, or None when it names a method (or there is none)."""
        return self.baseline if self.baseline in self.series else None


@dataclass
class DeploymentStudy:
    """A ``kind: deployment`` study: the deployment evaluation of some methods of a training study (``evaluated``)."""
    name: str
    title: str
    description: str
    evaluated: Study
    methods: List[Method]  # the evaluated study's, in table order
    evaluate_args: List[str]
    out: str  # the evaluation's folder name inside each run folder
    targets: Dict[str, float]
    findings: str = ""
    position: Optional[int] = None
    source: Optional[Path] = None

    def evaluations(self, only: Optional[Sequence[str]] = None,
                    seeds: Optional[Sequence[int]] = None) -> List[Tuple[Method, int, Path]]:
        """Every (method, seed, run folder) this study evaluates, seed-major, narrowed as :meth:`Study.runs`."""
        _check_narrowing(self.name, [m.name for m in self.methods], self.evaluated.seeds, only, seeds)
        return [(m, s, self.evaluated.run_dir(m.name, s)) for s in self.evaluated.seeds for m in self.methods
                if s in self.evaluated.seeds_of(m) and (not only or m.name in only) and (seeds is None or s in seeds)]

    def out_dir(self, run_dir: Path) -> Path:
        return run_dir / self.out

    def is_evaluated(self, run_dir: Path) -> bool:
        """Whether the deployment evaluation of ``run_dir`` is written (its ``metrics.json``)."""
        return (self.out_dir(run_dir) / "metrics.json").is_file()


def _check_narrowing(study: str, names: List[str], study_seeds: List[int], only: Optional[Sequence[str]],
                     seeds: Optional[Sequence[int]]) -> None:
    """``--only`` and ``--seeds`` name methods and seeds the study has."""
    unknown = [x for x in only or () if x not in names] + [x for x in seeds or () if x not in study_seeds]
    if unknown:
        raise ConfigError(f"study {study} has no method or seed {', '.join(map(str, unknown))}; its methods "
                          f"are {', '.join(names)} and its seeds {', '.join(map(str, study_seeds))}")


def load_study(path) -> Union[Study, DeploymentStudy]:
    """Read and check a study file (either kind); every run's configuration is resolved once here, so a typo in an
    override is an error before anything trains."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    kind = data.get("kind", "training")
    if kind not in KINDS:
        raise ConfigError(f"{path}: unknown study kind {kind!r}; a study is one of {', '.join(KINDS)}")
    return _load_deployment(path, data) if kind == "deployment" else _load_training(path, data)


def _load_training(path: Path, data: Dict[str, Any]) -> Study:
    missing = [k for k in ("name", "config", "seeds", "methods") if k not in data]
    if missing:
        raise ConfigError(f"{path}: study file lacks {', '.join(missing)}")
    unknown = set(data) - _STUDY_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown study keys {sorted(unknown)}")
    seeds = [int(s) for s in data["seeds"]]
    series = {str(k): str(v) for k, v in (data.get("series") or {}).items()}
    methods = [_method(path, name, spec or {}, seeds, series) for name, spec in data["methods"].items()]
    study = Study(
        name=data["name"], title=data.get("title", data["name"]), description=data.get("description", "").strip(),
        config=(path.parent / data["config"]).resolve(), output_root=Path(data.get("output_root",
                                                                                 f"outputs/studies/{data['name']}")),
        seeds=seeds, common=dict(data.get("common") or {}), methods=methods,
        baseline=data.get("baseline"), findings=(data.get("findings") or "").strip(),
        position=None if data.get("position") is None else int(data["position"]), source=path, series=series)
    _check_baseline(path, study)
    for method, seed in study.runs():
        method.epochs = parse_args(run_argv(study, method, seed)).epochs  # raises ConfigError naming a bad key
    return study


def _method(path: Path, name: str, spec: Dict[str, Any], study_seeds: List[int], series: Dict[str, str]) -> Method:
    """One method of a study file, its keys checked."""
    unknown = set(spec) - _METHOD_KEYS
    if unknown:
        raise ConfigError(f"{path}: method {name} has unknown keys {sorted(unknown)}; a method takes "
                          f"{', '.join(sorted(_METHOD_KEYS))}")
    source = spec.get("from")
    if source is not None and (str(source).count("/") != 1 or not all(str(source).split("/"))):
        raise ConfigError(f"{path}: method {name} has from: {source!r}; write it as STUDY/METHOD")
    if source is not None and spec.get("overrides"):
        raise ConfigError(f"{path}: method {name} takes its runs and settings from {source}, so it has no overrides")
    seeds = None if spec.get("seeds") is None else [int(s) for s in spec["seeds"]]
    if seeds is not None and (not seeds or set(seeds) - set(study_seeds)):
        raise ConfigError(f"{path}: method {name} has seeds {seeds}; give some of the study's seeds {study_seeds}")
    if spec.get("series") is not None and spec["series"] not in series:
        raise ConfigError(f"{path}: method {name} is in series {spec['series']!r}, which the study's series "
                          f"{sorted(series)} lack")
    return Method(name=name, label=spec.get("label", name), overrides=dict(spec.get("overrides") or {}), seeds=seeds,
                  taken_from=None if source is None else str(source), series=spec.get("series"))


def _check_baseline(path: Path, study: Study) -> None:
    names = [m.name for m in study.methods]
    if study.baseline is None:
        return
    if study.baseline in study.series and study.baseline in names:
        raise ConfigError(f"{path}: baseline {study.baseline!r} names both a method and a series; rename one")
    if study.baseline not in study.series and study.baseline not in names:
        also = f" or series {sorted(study.series)}" if study.series else ""
        raise ConfigError(f"{path}: baseline {study.baseline!r} is not one of the methods {names}{also}")


def _load_deployment(path: Path, data: Dict[str, Any]) -> DeploymentStudy:
    """A ``kind: deployment`` study file, checked, with the training study it evaluates loaded."""
    unknown = set(data) - _DEPLOYMENT_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown deployment study keys {sorted(unknown)}; a deployment study takes "
                          f"{', '.join(sorted(_DEPLOYMENT_KEYS))}")
    missing = [k for k in ("name", "evaluates", "methods") if k not in data]
    if missing:
        raise ConfigError(f"{path}: deployment study file lacks {', '.join(missing)}")
    evaluated_path = path.parent / f"{data['evaluates']}.yaml"
    if not evaluated_path.is_file():
        raise ConfigError(f"{path}: evaluates {data['evaluates']!r}, but there is no study file {evaluated_path}; "
                          "name a study file of the same folder, without .yaml")
    evaluated = load_study(evaluated_path)
    if not isinstance(evaluated, Study):
        raise ConfigError(f"{path}: evaluates {data['evaluates']!r}, a deployment study; name a training study")
    args = [str(a) for a in data.get("evaluate_args", DEFAULT_EVALUATE_ARGS)]
    if any(a == "--out" or a.startswith("--out=") for a in args):
        raise ConfigError(f"{path}: evaluate_args give --out; the study's `out` names the evaluation's folder")
    out = str(data.get("out", "eval_deployment"))
    if Path(out).name != out or out in ("", ".", ".."):
        raise ConfigError(f"{path}: out: {out!r}; give a folder name (it is written inside each run folder)")
    return DeploymentStudy(
        name=data["name"], title=data.get("title", data["name"]), description=(data.get("description") or "").strip(),
        evaluated=evaluated, methods=_evaluated_methods(path, evaluated, data["methods"]), evaluate_args=args, out=out,
        targets=_targets(path, data.get("targets")), findings=(data.get("findings") or "").strip(),
        position=None if data.get("position") is None else int(data["position"]), source=path)


def _evaluated_methods(path: Path, evaluated: Study, names: Any) -> List[Method]:
    """The methods a deployment study names: a list of methods the evaluated study trains itself."""
    by_name = {m.name: m for m in evaluated.methods}
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{path}: methods must be a list of methods of study {evaluated.name}")
    for name in names:
        if name not in by_name:
            raise ConfigError(f"{path}: study {evaluated.name} has no method {name!r}; its methods are "
                              f"{', '.join(by_name)}")
        if by_name[name].taken_from is not None:
            raise ConfigError(f"{path}: method {name} of study {evaluated.name} takes its runs from "
                              f"{by_name[name].taken_from}; evaluate that study's method instead")
    return [by_name[name] for name in names]


def _targets(path: Path, targets: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """:data:`DEFAULT_TARGETS` updated with the study file's ``targets``; an unknown target is an error."""
    unknown = set(targets or {}) - set(DEFAULT_TARGETS)
    if unknown:
        raise ConfigError(f"{path}: unknown targets {sorted(unknown)}; the targets are "
                          f"{', '.join(DEFAULT_TARGETS)}")
    return {k: float((targets or {}).get(k, v)) for k, v in DEFAULT_TARGETS.items()}


def cli_args(overrides: Dict[str, Any]) -> List[str]:
    """``{key: value}`` as ``recipes/train.py`` arguments (``--key value``; lists, mappings and booleans as JSON)."""
    argv = []
    for key, value in overrides.items():
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
        argv += [f"--{key}", "null" if value is None else text]
    return argv


def run_argv(study: Study, method: Method, seed: int) -> List[str]:
    """The ``recipes/train.py`` arguments of one run (without ``--resume``)."""
    return ["--config", str(study.config), *cli_args(study.common), *cli_args(method.overrides), "--seed", str(seed),
            "--output_dir", str(study.run_dir(method.name, seed)), *study.extra_args]


def evaluate_argv(study: DeploymentStudy, run_dir: Path) -> List[str]:
    """The ``recipes/evaluate.py`` arguments of one run's deployment evaluation."""
    return [str(run_dir), *study.evaluate_args, "--out", str(study.out_dir(run_dir))]


def is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its evaluation and run info written)."""
    return (run_dir / "eval" / "metrics.json").is_file() and (run_dir / "run_info.json").is_file()
