"""Tables and the figure of algorithm-level error against learning rate and training length.

Entry point: :func:`draw_error_figures` reads the ``error_summary.csv`` of every run under a sweep
directory (as ``attrbench run -m +analysis=error ...`` writes them) and writes, into an output
directory,

* ``error_grid.csv`` / ``.md``: mean and standard deviation over seeds of the measured error, the
  second-order term and the proxy for each (learning rate, number of steps) cell;
* ``error_grid_correlations.csv`` / ``.md``: Spearman correlation of the measured error with each
  predictor across all runs and across the seed-averaged cells;
* ``error_vs_lr_and_steps.png``: measured and predicted error against the learning rate (one line
  per training length) and against the number of steps (one line per learning rate).
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from attrbench.evaluation.report import format_markdown  # noqa: E402
from attrbench.io import FIGURE_METADATA, write_text  # noqa: E402
from attrbench.reporting.collect import FAILED_FILE  # noqa: E402

log = logging.getLogger(__name__)

SUMMARY_FILE = "error_summary.csv"
CELL = ["lr", "num_steps"]
QUANTITIES = ["measured_error", "second_order_term", "second_order_residual", "proxy", "proxy_optimizer_term",
              "proxy_curvature_term", "spearman_first_order", "spearman_second_order", "spearman_error_proxy"]
PREDICTORS = {
    "second_order_term": "exact second-order term",
    "proxy": "closed-form proxy",
    "proxy_optimizer_term": "proxy, optimizer term only",
    "proxy_curvature_term": "proxy, curvature term only",
}


def error_summary_paths(sweep_dir: str | Path) -> list[Path]:
    """List the ``error_summary.csv`` files under ``sweep_dir``, except those of failed runs.

    A failed rerun in a reused run directory leaves the earlier attempt's table next to its
    ``failed.json``, and ``attrbench report`` counts a failed run only as a failure.
    """
    paths = sorted(Path(sweep_dir).rglob(SUMMARY_FILE))
    return [path for path in paths if not (path.parent / FAILED_FILE).exists()]


def collect_error_summaries(sweep_dir: str | Path) -> pd.DataFrame:
    """Concatenate the ``error_summary.csv`` of every run under ``sweep_dir``, with a ``run_dir`` column.

    Failed runs are left out (see :func:`error_summary_paths`).

    Raises:
        FileNotFoundError: If there is none.
    """
    sweep_dir = Path(sweep_dir)
    paths = error_summary_paths(sweep_dir)
    failed = sorted(set(sweep_dir.rglob(SUMMARY_FILE)) - set(paths))
    if failed:
        log.warning("left out the %s of %d failed runs: %s", SUMMARY_FILE, len(failed),
                    ", ".join(str(path.parent) for path in failed))
    if not paths:
        raise FileNotFoundError(
            f"no {SUMMARY_FILE} under {sweep_dir}; run the sweep with +analysis=error first"
        )
    frames = [pd.read_csv(path).assign(run_dir=str(path.parent.relative_to(sweep_dir))) for path in paths]
    return pd.concat(frames, ignore_index=True)


def error_grid(summaries: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds for each (learning rate, number of steps) cell."""
    grouped = summaries.groupby(CELL)
    table = grouped[[column for column in QUANTITIES if column in summaries]].agg(["mean", "std"])
    table.columns = [f"{name}_{statistic}" for name, statistic in table.columns]
    table["seeds"] = grouped["seed"].nunique()
    return table.reset_index()


def grid_correlations(summaries: pd.DataFrame) -> pd.DataFrame:
    """Spearman of the measured error with each predictor, across runs and across seed-averaged cells."""
    predictors = {column: label for column, label in PREDICTORS.items() if column in summaries}
    cells = summaries.groupby(CELL)[list(predictors) + ["measured_error"]].mean()
    rows = []
    for column, label in predictors.items():
        rows.append({
            "predictor": label,
            "spearman_across_runs": _spearman(summaries.measured_error, summaries[column]),
            "runs": len(summaries),
            "spearman_across_cells": _spearman(cells.measured_error, cells[column]),
            "cells": len(cells),
            "ratio_of_totals": float(summaries[column].sum() / summaries.measured_error.sum()),
        })
    return pd.DataFrame(rows)


def plot_error_grid(summaries: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Plot error against the learning rate and against the number of steps (two log-log panels)."""
    styles = {"measured_error": ("-", "o", "measured"), "second_order_term": (":", "s", "second-order term"),
              "proxy": ("--", "^", "proxy"), "proxy_optimizer_term": ("-.", "v", "proxy, optimizer term")}
    styles = {column: style for column, style in styles.items() if column in summaries}
    cells = summaries.groupby(CELL)[list(styles)].mean().reset_index()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (x, line_key, x_label) in zip(
        axes, (("lr", "num_steps", "learning rate"), ("num_steps", "lr", "number of steps T"))
    ):
        colors = plt.cm.viridis(np.linspace(0.0, 0.85, cells[line_key].nunique()))
        for color, (value, group) in zip(colors, cells.groupby(line_key)):
            group = group.sort_values(x)
            label = f"T = {value}" if line_key == "num_steps" else f"lr = {value:g}"
            for column, (style, marker, name) in styles.items():
                axis.plot(group[x], group[column], linestyle=style, marker=marker, color=color,
                          label=f"{name}, {label}" if column == "measured_error" else None)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(x_label)
        axis.set_ylabel("mean |error| per (test, sample) pair")
        axis.legend(fontsize=7, loc="best")
    legend = [plt.Line2D([], [], color="0.3", linestyle=style, marker=marker, label=name)
              for style, marker, name in styles.values()]
    figure.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10, y=0.02, va="bottom")
    figure.tight_layout(rect=(0, 0.04, 1, 0.93))
    figure.savefig(path, dpi=130, metadata=FIGURE_METADATA)
    plt.close(figure)


def draw_error_figures(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the grid tables and the figure for the sweep in ``sweep_dir``; return the written paths.

    Args:
        sweep_dir: Directory containing the sweep's run directories (searched recursively).
        out_dir: Where to write; defaults to ``sweep_dir``.
    """
    out_dir = Path(out_dir or sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = collect_error_summaries(sweep_dir)
    for table, stem in ((error_grid(summaries), "error_grid"), (grid_correlations(summaries), "error_grid_correlations")):
        write_text(out_dir / f"{stem}.csv", table.to_csv(index=False))
        write_text(out_dir / f"{stem}.md", format_markdown(table, floatfmt=".4g"))
    figure = out_dir / "error_vs_lr_and_steps.png"
    setting = ", ".join(sorted(summaries.setting.unique()))
    plot_error_grid(summaries, figure, f"{setting}: first-order error, {summaries.seed.nunique()} seeds")
    log.info("error figures: %d runs from %s written to %s", len(summaries), sweep_dir, out_dir)
    return [out_dir / "error_grid.csv", out_dir / "error_grid_correlations.csv", figure]


def seed_summary(sweep_dir: str | Path) -> pd.DataFrame:
    """Tabulate mean and standard deviation over the runs of a sweep for each method.

    Reads every run's ``spearman.csv`` (mean Spearman per method) and, where present, its
    ``error_summary.csv``, whose error columns are added as rows of their own.
    """
    sweep_dir = Path(sweep_dir)
    paths = sorted(sweep_dir.rglob("spearman.csv"))
    if not paths:
        raise FileNotFoundError(f"no spearman.csv under {sweep_dir}; run the sweep first")
    spearman = pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)
    rows = [
        {"quantity": f"Spearman, {method}", "mean": group.spearman_mean.mean(),
         "std": group.spearman_mean.std(ddof=1), "runs": len(group)}
        for method, group in spearman.groupby("method", sort=False)
    ]
    errors = [pd.read_csv(path) for path in sorted(sweep_dir.rglob(SUMMARY_FILE))]
    if errors:
        errors = pd.concat(errors, ignore_index=True)
        for column in ("measured_error", "second_order_term", "second_order_residual", "proxy",
                       "spearman_error_second_order", "spearman_error_proxy", "ratio_second_order",
                       "ratio_proxy", "second_order_seconds", "proxy_seconds"):
            if column not in errors:
                continue
            rows.append({"quantity": column, "mean": errors[column].mean(),
                         "std": errors[column].std(ddof=1), "runs": len(errors)})
    return pd.DataFrame(rows)


def _spearman(x, y) -> float:
    from scipy import stats  # imported here so that redrawing figures does not load scipy

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)
