"""Seeded studies: a grid of ``recipes/train.py`` configurations x seeds, run, resumed and reported from the run
folders. It drives a checkout's training recipe by path, so it lives beside the recipes, not in the installed
package; ``recipes/study.py`` is its command line.

- :mod:`.study`: the study file (both kinds; its format is documented there), its runs and their command lines;
- :mod:`.run`: start the unfinished runs, resume killed ones, leave runs held by another runner alone; a deployment
  study's evaluations likewise;
- :mod:`.stats`: a number over seeds, its mean and spread, and how a cell shows it;
- :mod:`.record`: read the finished run folders into one JSON record per study;
- :mod:`.deployment`: read a deployment study's evaluations into its record;
- :mod:`.report`: turn the records into the tables of ``docs/results.md``;
- :mod:`.deployment_report`: a deployment study's tables and checks;
- :mod:`.figure`: the schedule-length figure of a study with series.
"""
from .deployment import collect_deployment
from .deployment_report import fill_deployment, render_deployment
from .record import collect, read_source
from .report import fill_numbers, render_markdown, render_study, write_results
from .run import run_evaluations, run_study
from .study import DeploymentStudy, Method, Study, evaluate_argv, is_finished, load_study, run_argv

__all__ = ["Study", "DeploymentStudy", "Method", "load_study", "run_argv", "evaluate_argv", "is_finished",
           "run_study", "run_evaluations", "collect", "collect_deployment", "read_source", "render_markdown",
           "render_study", "render_deployment", "fill_numbers", "fill_deployment", "write_results"]
