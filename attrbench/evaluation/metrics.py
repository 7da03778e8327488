"""Per-test-point rank correlation between predicted and true leave-one-out effects."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats


def rowwise_correlations(predicted: np.ndarray, actual: np.ndarray) -> pd.DataFrame:
    """Spearman, Pearson and Kendall correlation of each row (test point) across columns (samples).

    A row in which either side is constant has no defined correlation and gets NaN.

    Returns:
        One row per test point with columns ``spearman``, ``pearson``, ``kendall``.
    """
    predicted, actual = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and actual {actual.shape} must be equal 2-D shapes")
    spearman = _pearson_rows(stats.rankdata(predicted, axis=1), stats.rankdata(actual, axis=1))
    pearson = _pearson_rows(predicted, actual)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        kendall = np.array([stats.kendalltau(p, a).statistic for p, a in zip(predicted, actual)])
    return pd.DataFrame({"spearman": spearman, "pearson": pearson, "kendall": kendall})


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (x * y).sum(axis=1) / denominator, np.nan)


def summarize(per_test: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over test points, one row per method.

    Args:
        per_test: Columns ``method``, ``spearman``, ``pearson``, ``kendall`` (one row per method and
            test point).
    """
    grouped = per_test.groupby("method", sort=False)
    table = pd.DataFrame(
        {
            "spearman_mean": grouped["spearman"].mean(),
            "spearman_std": grouped["spearman"].std(ddof=1),
            "spearman_median": grouped["spearman"].median(),
            "pearson_mean": grouped["pearson"].mean(),
            "kendall_mean": grouped["kendall"].mean(),
            "test_points": grouped["spearman"].count(),
            "undefined": grouped["spearman"].apply(lambda s: int(s.isna().sum())),
        }
    )
    return table.reset_index()
