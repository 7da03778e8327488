"""Vectorised row-wise correlations against scipy, one row at a time."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from attrbench.evaluation.metrics import rowwise_correlations, summarize


def test_rowwise_correlations_match_scipy_loop():
    rng = np.random.default_rng(0)
    actual = rng.normal(size=(20, 30))
    predicted = actual + rng.normal(size=(20, 30))
    predicted[3, :5] = predicted[3, 5]  # ties
    table = rowwise_correlations(predicted, actual)
    for row in range(20):
        assert np.isclose(table.spearman[row], stats.spearmanr(predicted[row], actual[row]).statistic, atol=1e-12)
        assert np.isclose(table.pearson[row], stats.pearsonr(predicted[row], actual[row]).statistic, atol=1e-12)
        assert np.isclose(table.kendall[row], stats.kendalltau(predicted[row], actual[row]).statistic, atol=1e-12)


def test_constant_row_is_undefined():
    actual = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    table = rowwise_correlations(np.array([[1.0, 3.0, 2.0], [1.0, 2.0, 3.0]]), actual)
    assert np.isclose(table.spearman[0], 0.5)
    assert np.isnan(table.spearman[1])


def test_summarize_means_and_counts():
    per_test = pd.DataFrame(
        {
            "method": ["a", "a", "a", "b", "b", "b"],
            "spearman": [0.1, 0.3, np.nan, 0.5, 0.7, 0.9],
            "pearson": [0.0] * 6,
            "kendall": [0.0] * 6,
        }
    )
    table = summarize(per_test).set_index("method")
    assert np.isclose(table.loc["a", "spearman_mean"], 0.2)
    assert table.loc["a", "undefined"] == 1
    assert table.loc["a", "test_points"] == 2
    assert np.isclose(table.loc["b", "spearman_std"], 0.2)
