"""Figures of one run: predicted-vs-true scatter and mean Spearman per method."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_scatter(
    actual: np.ndarray, predictions: dict[str, np.ndarray], test_points: list[int], path: Path, title: str = ""
) -> None:
    """One panel per test point: predicted against true leave-one-out effect, a color per method."""
    columns = len(test_points)
    figure, axes = plt.subplots(1, columns, figsize=(3.6 * columns, 3.4), squeeze=False)
    for axis, test_point in zip(axes[0], test_points):
        for method, predicted in predictions.items():
            axis.scatter(actual[test_point], predicted[test_point], s=8, alpha=0.6, label=method)
        limit = np.abs(actual[test_point]).max()
        axis.axhline(0, color="0.8", lw=0.8)
        axis.axvline(0, color="0.8", lw=0.8)
        axis.set_xlim(-1.1 * limit, 1.1 * limit)
        axis.set_title(f"test point {test_point}", fontsize=9)
        axis.set_xlabel("true delta (leave-one-out)")
    axes[0][0].set_ylabel("predicted delta")
    axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def plot_spearman_bars(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Bar per method: mean Spearman over test points, with the standard deviation as error bar."""
    figure, axis = plt.subplots(figsize=(1.6 + 1.2 * len(table), 3.2))
    positions = np.arange(len(table))
    axis.bar(positions, table["spearman_mean"], yerr=table["spearman_std"], capsize=4, color="tab:blue", alpha=0.8)
    axis.set_xticks(positions, table["method"], rotation=15, fontsize=8)
    axis.set_ylabel("mean Spearman over test points")
    axis.axhline(0, color="0.5", lw=0.8)
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
