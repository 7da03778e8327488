"""Average the per-run Spearman correlations over seeds.

Each run contributes one number per method: its mean Spearman over test points. The report
averages those numbers over the seeds of one experiment (same setting, variant, optimizer,
learning rate and distinguishing config values) and compares AdamW-influence with SGD-influence.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

BASELINE_METHOD = "sgd_influence"
IMPROVED_METHOD = "adamw_influence"

RESULT_COLUMNS = ["method", "spearman_mean", "spearman_std", "num_seeds", "seeds", "missing_seeds",
                  "relative_improvement"]


def experiment_columns(columns: Iterable[str]) -> list[str]:
    """Return the columns that name an experiment family in a runs or report table.

    They run from ``setting`` up to, not including, ``lr``: ``setting``, ``variant``,
    ``optimizer`` and any distinguishing config keys.
    """
    columns = list(columns)
    return columns[columns.index("setting"):columns.index("lr")]


def aggregate_seeds(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count over seeds, and AdamW-influence's relative improvement.

    Args:
        runs: One row per run and method, as :func:`attrbench.reporting.collect.runs_frame` builds.

    Returns:
        One row per experiment and method, with the columns of ``runs`` up to ``lr`` followed by
        ``method``, ``spearman_mean`` (mean over seeds of the runs' mean Spearman over test
        points), ``spearman_std`` (sample standard deviation over seeds, ddof=1, so NaN for one
        seed), ``num_seeds``, ``seeds`` (comma-separated), ``missing_seeds`` (seeds that other
        runs of the same setting and variant have and this experiment lacks) and
        ``relative_improvement`` (on the AdamW-influence row only, see
        :func:`relative_improvement`). A NaN Spearman of any seed makes the mean NaN rather than
        being skipped.
    """
    keys = experiment_columns(runs.columns) + ["lr"]
    if runs.empty:
        return pd.DataFrame(columns=keys + RESULT_COLUMNS)

    rows = []
    for values, group in runs.groupby(keys + ["method"], sort=False, dropna=False):
        spearman = group["spearman_mean"].astype(float)
        rows.append({
            **dict(zip(keys + ["method"], values)),
            "spearman_mean": spearman.mean(skipna=False),
            "spearman_std": spearman.std(ddof=1, skipna=False),
            "num_seeds": group["seed"].nunique(),
            "seeds": _join_seeds(group["seed"]),
        })
    table = pd.DataFrame(rows)
    table["missing_seeds"] = _missing_seeds(runs, table)
    table["relative_improvement"] = _improvement_column(table, keys)
    return _sort(table, keys, method_order=list(dict.fromkeys(runs["method"])))[keys + RESULT_COLUMNS]


def relative_improvement(improved: float, baseline: float) -> float:
    """``(improved - baseline) / |baseline|``: +0.5 means 50 % above the baseline; NaN when it is 0."""
    if baseline == 0 or np.isnan(baseline) or np.isnan(improved):
        return float("nan")
    return (improved - baseline) / abs(baseline)


def _join_seeds(seeds: pd.Series) -> str:
    return ",".join(str(seed) for seed in sorted(set(int(seed) for seed in seeds)))


def _missing_seeds(runs: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    expected = runs.groupby(["setting", "variant"])["seed"].agg(lambda seeds: set(int(s) for s in seeds))
    missing = []
    for row in table.itertuples(index=False):
        present = {int(seed) for seed in row.seeds.split(",")}
        absent = expected[(row.setting, row.variant)] - present
        missing.append(",".join(str(seed) for seed in sorted(absent)))
    return missing


def _improvement_column(table: pd.DataFrame, keys: list[str]) -> list[float]:
    improvements = [float("nan")] * len(table)
    for _, group in table.groupby(keys, sort=False, dropna=False):
        means = dict(zip(group["method"], group["spearman_mean"]))
        if BASELINE_METHOD not in means or IMPROVED_METHOD not in means:
            continue
        position = table.index.get_loc(group.index[group["method"] == IMPROVED_METHOD][0])
        improvements[position] = relative_improvement(means[IMPROVED_METHOD], means[BASELINE_METHOD])
    return improvements


def _sort(table: pd.DataFrame, keys: list[str], method_order: list[str]) -> pd.DataFrame:
    """Order by experiment family, then largest learning rate first, then methods as the runs list them."""
    family = keys[:-1]
    ordered = table.assign(
        _lr=-table["lr"].astype(float),
        _method=table["method"].map({method: rank for rank, method in enumerate(method_order)}),
    )
    ordered = ordered.sort_values(family + ["_lr", "_method"], key=_sortable, kind="stable")
    return ordered.drop(columns=["_lr", "_method"]).reset_index(drop=True)


def _sortable(column: pd.Series) -> pd.Series:
    """Sort numbers as numbers and anything else as text, so a column of mixed types still sorts."""
    if pd.api.types.is_numeric_dtype(column):
        return column
    return column.astype(str)
