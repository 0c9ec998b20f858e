"""Seeded studies: a grid of ``recipes/train.py`` configurations x seeds, run, resumed and reported from the run
folders. It drives a checkout's training recipe by path, so it lives beside the recipes, not in the installed
package; ``recipes/study.py`` is its command line.

- :mod:`.study`: the study file (its format is documented there), its runs and their command lines;
- :mod:`.run`: start the unfinished runs, resume killed ones, leave runs held by another runner alone;
- :mod:`.record`: read the finished run folders into one JSON record per study;
- :mod:`.report`: turn the records into the tables of ``docs/results.md``;
- :mod:`.figure`: the schedule-length figure of a study with series.
"""
from .record import collect, read_source
from .report import fill_numbers, render_markdown, render_study, write_results
from .run import run_study
from .study import Method, Study, is_finished, load_study, run_argv

__all__ = ["Study", "Method", "load_study", "run_argv", "is_finished", "run_study", "collect", "read_source",
           "render_markdown", "render_study", "fill_numbers", "write_results"]
