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
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ncl_hub.config import ConfigError, parse_args

REPO = Path(__file__).resolve().parents[2]  # the checkout whose recipes/train.py the runs use
_STUDY_KEYS = {"name", "title", "description", "findings", "config", "output_root", "seeds", "common", "methods",
               "baseline", "position", "series"}
_METHOD_KEYS = {"label", "overrides", "seeds", "from", "series"}


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
        names = [m.name for m in self.methods]
        unknown = [x for x in only or () if x not in names] + [x for x in seeds or () if x not in self.seeds]
        if unknown:
            raise ConfigError(f"study {self.name} has no method or seed {', '.join(map(str, unknown))}; its methods "
                              f"are {', '.join(names)} and its seeds {', '.join(map(str, self.seeds))}")
        return [(m, s) for s in self.seeds for m in self.methods
                if m.taken_from is None and s in self.seeds_of(m) and (not only or m.name in only)
                and (seeds is None or s in seeds)]

    def taken(self, only: Optional[Sequence[str]] = None) -> List[Method]:
        """The methods whose runs are taken from another study's record (``from``), narrowed to ``only``."""
        return [m for m in self.methods if m.taken_from is not None and (not only or m.name in only)]

    def baseline_series(self) -> Optional[str]:
        """The series the baseline names, or None when it names a method (or there is none)."""
        return self.baseline if self.baseline in self.series else None


def load_study(path) -> Study:
    """Read and check a study file; every run's configuration is resolved once here, so a typo in an override
    is an error before anything trains."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
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


def is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its evaluation and run info written)."""
    return (run_dir / "eval" / "metrics.json").is_file() and (run_dir / "run_info.json").is_file()
