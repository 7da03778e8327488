"""The error-analysis and data-selection sections of ``attrbench report`` and ``attrbench figures``.

Runs with ``+analysis=error`` write ``error_summary.csv``, and ``attrbench select`` runs write
``selection.json``. When the reported directory contains either, the report directory gains:

- ``error_runs.csv``: every run's error summary (the input of the error figure);
- ``error_grid.csv`` / ``.md`` and ``error_grid_correlations.csv`` / ``.md``: error per
  (learning rate, number of steps) cell over seeds, and how well each predictor ranks it;
- ``selection.csv`` / ``.md`` and ``best_horizon.csv`` / ``.md``: final test loss and accuracy
  per horizon K, learning rate and fraction over seeds, and the best K per learning rate.

``attrbench figures`` redraws their figures from these tables alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from attrbench.evaluation.report import format_markdown, write_table
from attrbench.io import write_text

log = logging.getLogger(__name__)

ERROR_RUNS_CSV = "error_runs.csv"
SELECTION_CSV, BEST_HORIZON_CSV = "selection.csv", "best_horizon.csv"
SELECTION_COLUMNS = ["lr", "fraction", "label", "seeds", "test_loss_mean", "test_loss_std",
                     "test_accuracy_mean", "test_accuracy_std"]


def has_extra_sections(root: Path) -> bool:
    return _has_error_summaries(root) or _has_selection_results(root)


def _has_error_summaries(root: Path) -> bool:
    from attrbench.analysis.figures import error_summary_paths

    return bool(error_summary_paths(root))


def _has_selection_results(root: Path) -> bool:
    from attrbench.selection.report import selection_paths

    return bool(selection_paths(root))


def write_extra_sections(root: Path, output: Path) -> list[str]:
    """Write the error and selection tables for the runs under ``root``; return Markdown sections.

    Failed runs contribute to neither section, even where an earlier attempt left its tables.
    """
    sections = []
    if _has_error_summaries(root):
        sections.append(_write_error_section(root, output))
    if _has_selection_results(root):
        sections.append(_write_selection_section(root, output))
    return sections


def _write_error_section(root: Path, output: Path) -> str:
    from attrbench.analysis.figures import collect_error_summaries, error_grid, grid_correlations

    summaries = collect_error_summaries(root)
    write_text(output / ERROR_RUNS_CSV, summaries.to_csv(index=False))
    correlations = grid_correlations(summaries)
    for table, stem in ((error_grid(summaries), "error_grid"), (correlations, "error_grid_correlations")):
        write_text(output / f"{stem}.csv", table.to_csv(index=False))
        write_text(output / f"{stem}.md", format_markdown(table, floatfmt=".4g"))
    return ("## First-order error against learning rate and training length\n\n"
            f"{len(summaries)} runs with +analysis=error. How well each predictor ranks the measured "
            f"error:\n\n{format_markdown(correlations, floatfmt='.4g')}")


def _write_selection_section(root: Path, output: Path) -> str:
    from attrbench.selection.report import best_horizons, collect_results, selection_table

    table = selection_table(collect_results(root))
    write_table(table, output, SELECTION_CSV.removesuffix(".csv"))
    write_table(best_horizons(table), output, BEST_HORIZON_CSV.removesuffix(".csv"))
    return ("## Data selection: final test loss by look-ahead horizon\n\n"
            f"{format_markdown(table[[c for c in SELECTION_COLUMNS if c in table]])}")


def draw_extra_figures(report_dir: Path, figure_dir: Path) -> list[Path]:
    """Redraw the error and selection figures from the tables in ``report_dir``."""
    written: list[Path] = []
    if (report_dir / ERROR_RUNS_CSV).is_file():
        from attrbench.analysis.figures import plot_error_grid

        summaries = pd.read_csv(report_dir / ERROR_RUNS_CSV)
        title = f"{', '.join(sorted(summaries.setting.unique()))}: first-order error, {summaries.seed.nunique()} seeds"
        for suffix in ("png", "pdf"):
            path = figure_dir / f"error_vs_lr_and_steps.{suffix}"
            plot_error_grid(summaries, path, title)
            written.append(path)
    if (report_dir / SELECTION_CSV).is_file():
        from attrbench.selection.report import plot_best_horizon, plot_loss_vs_horizon

        table = pd.read_csv(report_dir / SELECTION_CSV)
        best = pd.read_csv(report_dir / BEST_HORIZON_CSV)
        for suffix in ("png", "pdf"):
            plot_loss_vs_horizon(table, figure_dir / f"test_loss_vs_horizon.{suffix}")
            written.append(figure_dir / f"test_loss_vs_horizon.{suffix}")
            if len(best):
                plot_best_horizon(best, figure_dir / f"best_horizon_vs_lr.{suffix}")
                written.append(figure_dir / f"best_horizon_vs_lr.{suffix}")
    return written
