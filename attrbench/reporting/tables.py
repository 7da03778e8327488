"""Build and write the report tables of ``attrbench report``.

A report directory contains:

- ``spearman.csv``: one row per experiment and method, averaged over seeds (see
  :func:`attrbench.reporting.aggregate.aggregate_seeds`).
- ``runs.csv``: the per-run values behind it, one row per run and method.
- ``problems.csv``: the runs that were not counted (failed, incomplete, duplicate) and why.
- ``scatter.csv``: true and predicted leave-one-out effects of one test point, for one run of
  each experiment family, so the scatter figure never needs the run's tensors again.
- ``report.md``: the table and the runs not counted, as printed to the terminal.

Run directories appear relative to the directory that was reported on, so the report still
reads correctly after that directory moves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from attrbench.io import write_text
from attrbench.reporting.aggregate import aggregate_seeds, experiment_columns
from attrbench.reporting.collect import (
    COMPLETE, STATUSES, distinguishing_keys, find_runs, mark_duplicates, problems_frame, runs_frame,
)

log = logging.getLogger(__name__)

TABLE_CSV, RUNS_CSV, PROBLEMS_CSV, SCATTER_CSV, REPORT_MD = (
    "spearman.csv", "runs.csv", "problems.csv", "scatter.csv", "report.md")
GROUNDTRUTH_FILE, PREDICTIONS_FILE = "groundtruth.safetensors", "predictions.safetensors"
SCATTER_COLUMNS = ["test_point", "sample", "method", "true_delta", "predicted_delta"]


@dataclass
class Report:
    """Everything ``attrbench report`` writes, as DataFrames."""

    root: Path
    table: pd.DataFrame
    runs: pd.DataFrame
    problems: pd.DataFrame
    scatter: pd.DataFrame
    status_counts: dict[str, int]


def build_report(root: str | Path, test_point: int = 0, scatter_runs: list[str] | None = None) -> Report:
    """Read every run under ``root`` and build the report tables.

    Args:
        root: A run directory, a sweep directory or any directory above them.
        test_point: The test point whose effects ``scatter.csv`` stores.
        scatter_runs: Run directories (relative to ``root`` or absolute) to take the scatter data
            from. By default each experiment family contributes one run: among those that saved
            their tensors, the one with the largest learning rate, then the smallest seed.

    Raises:
        FileNotFoundError: When ``root`` contains no run directory.
    """
    root = Path(root)
    records = find_runs(root)
    if not records:
        raise FileNotFoundError(
            f"no runs under {root}: a run directory contains summary.json, failed.json or .hydra/; "
            "pass the output directory of `attrbench run` or of a sweep"
        )
    extra_keys = distinguishing_keys(records)
    mark_duplicates(records, extra_keys)

    runs = runs_frame(records, extra_keys)
    runs["run_dir"] = [_relative(path, root) for path in runs["run_dir"]]
    problems = problems_frame(records)
    problems["run_dir"] = [_relative(path, root) for path in problems["run_dir"]]
    table = aggregate_seeds(runs)
    scatter = scatter_frame(root, runs, test_point, scatter_runs)
    counts = {status: sum(record.status == status for record in records) for status in STATUSES}
    return Report(root, table, runs, problems, scatter, counts)


def _relative(path: str | Path, root: Path) -> str:
    return os.path.relpath(path, root)


def scatter_frame(root: Path, runs: pd.DataFrame, test_point: int, scatter_runs: list[str] | None) -> pd.DataFrame:
    """Collect the true and predicted effects of ``test_point`` in the chosen runs, a row per method and sample.

    Raises:
        ValueError: When a requested run is not a finished run under ``root``.
    """
    if scatter_runs:
        chosen = [_relative(root / path, root) for path in scatter_runs]
        unknown = sorted(set(chosen) - set(runs["run_dir"]))
        if unknown:
            raise ValueError(f"--scatter-run {', '.join(unknown)} is not a finished run under {root}")
    else:
        chosen = _default_scatter_runs(root, runs)

    identity_columns = experiment_columns(runs.columns) + ["lr", "seed", "run_dir"]
    frames = []
    for run_dir in chosen:
        identity = runs.loc[runs["run_dir"] == run_dir, identity_columns].iloc[0].to_dict()
        methods = list(runs.loc[runs["run_dir"] == run_dir, "method"])
        frames.append(_scatter_rows(root / run_dir, test_point, methods).assign(**identity))
    if not frames:
        return pd.DataFrame(columns=identity_columns + SCATTER_COLUMNS)
    return pd.concat(frames, ignore_index=True)[identity_columns + SCATTER_COLUMNS]


def _default_scatter_runs(root: Path, runs: pd.DataFrame) -> list[str]:
    """Per experiment family: the run with the largest learning rate, then smallest seed, that has tensors."""
    chosen = []
    family = experiment_columns(runs.columns)
    candidates = runs.drop_duplicates("run_dir")
    candidates = candidates.sort_values(["lr", "seed"], ascending=[False, True], kind="stable")
    for _, group in candidates.groupby(family, sort=False, dropna=False):
        with_tensors = [run_dir for run_dir in group["run_dir"] if _has_tensors(root / run_dir)]
        if with_tensors:
            chosen.append(with_tensors[0])
        else:
            log.warning("no run of %s saved %s and %s; its scatter data is skipped",
                        " ".join(map(str, group.iloc[0][family])), GROUNDTRUTH_FILE, PREDICTIONS_FILE)
    return chosen


def _has_tensors(directory: Path) -> bool:
    return (directory / GROUNDTRUTH_FILE).is_file() and (directory / PREDICTIONS_FILE).is_file()


def _scatter_rows(directory: Path, test_point: int, methods: list[str]) -> pd.DataFrame:
    """Read one run's tensors and return ``test_point``'s true and predicted effects in long form.

    ``methods`` gives the order of the methods (as in the run's table); predictions of other
    methods follow in file order.

    Raises:
        ValueError: When ``test_point`` is not a test point of the run.
    """
    groundtruth = load_file(str(directory / GROUNDTRUTH_FILE))
    predictions = load_file(str(directory / PREDICTIONS_FILE))
    delta, samples = groundtruth["delta"], groundtruth["samples"]
    if not 0 <= test_point < delta.shape[0]:
        raise ValueError(
            f"--test-point {test_point} is out of range: {directory} has test points 0 to {delta.shape[0] - 1}"
        )
    frames = [
        pd.DataFrame({
            "test_point": test_point,
            "sample": samples.astype(np.int64),
            "method": method,
            "true_delta": delta[test_point],
            "predicted_delta": predicted[test_point],
        })
        for method, predicted in sorted(predictions.items(), key=lambda item: _rank(item[0], methods))
    ]
    return pd.concat(frames, ignore_index=True)


def _rank(method: str, methods: list[str]) -> int:
    return methods.index(method) if method in methods else len(methods)


def write_report(report: Report, directory: str | Path) -> None:
    """Write the CSV tables and ``report.md`` into ``directory`` atomically."""
    directory = Path(directory)
    write_text(directory / TABLE_CSV, report.table.to_csv(index=False))
    write_text(directory / RUNS_CSV, report.runs.to_csv(index=False))
    write_text(directory / PROBLEMS_CSV, report.problems.to_csv(index=False))
    write_text(directory / SCATTER_CSV, report.scatter.to_csv(index=False))
    write_text(directory / REPORT_MD, format_report(report))


def format_report(report: Report) -> str:
    """Format the Markdown report: run counts, the table over seeds and the runs not counted."""
    counts = report.status_counts
    not_counted = ", ".join(f"{count} {status.replace('_', ' ')}" for status, count in counts.items()
                            if status != COMPLETE and count)
    lines = [
        f"# attrbench report: {report.root}",
        "",
        f"{counts[COMPLETE]} finished runs counted. Not counted: {not_counted or 'none'}.",
        "",
        format_table(report.table),
        "Spearman: each run's mean Spearman correlation over test points, averaged over seeds; std is "
        "the sample standard deviation over seeds (blank for one seed). AdamW vs SGD: "
        "(AdamW-influence - SGD-influence) / |SGD-influence|.",
    ]
    if not report.problems.empty:
        lines += ["", "## Runs not counted", "", _markdown(report.problems.drop(columns=["overrides"]))]
    return "\n".join(lines) + "\n"


def format_table(table: pd.DataFrame) -> str:
    """Format the seed-averaged table as Markdown, with readable learning rates and percentages."""
    display = table.copy()
    display["lr"] = [f"{lr:g}" for lr in display["lr"]]
    display["relative_improvement"] = [
        "" if pd.isna(value) else f"{100 * value:+.1f}%" for value in display["relative_improvement"]
    ]
    if (display["missing_seeds"].fillna("") == "").all():
        display = display.drop(columns=["missing_seeds"])
    display = display.rename(columns={
        "spearman_mean": "Spearman", "spearman_std": "std", "num_seeds": "n",
        "relative_improvement": "AdamW vs SGD",
    })
    # Correlations get four decimals. Config columns that vary between runs keep their own
    # precision, so 1e-08 does not print as 0.0000.
    return _markdown(display, column_formats={"Spearman": "{:.4f}", "std": "{:.4f}"})


def _markdown(frame: pd.DataFrame, float_format: str = "{:g}", column_formats: dict[str, str] | None = None) -> str:
    """Format ``frame`` as Markdown with floats by ``float_format`` and missing values blank.

    ``column_formats`` overrides ``float_format`` for the float columns it names.

    tabulate's own number parsing would turn a seed list such as "0" into a number and print NaN
    as "nan", so it is switched off and numbers are right-aligned explicitly.
    """
    cells, align = {}, []
    for name, column in frame.items():
        numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        is_float = pd.api.types.is_float_dtype(column)
        number_format = (column_formats or {}).get(name, float_format)
        cells[name] = [_cell(value, number_format if is_float else "{}") for value in column]
        align.append("right" if numeric else "left")
    text = pd.DataFrame(cells, columns=frame.columns)
    if text.empty:
        return "(none)\n"
    return text.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


def _cell(value, template: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return template.format(value)
