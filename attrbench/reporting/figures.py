"""Draw the report figures from the saved report tables, as PNG and PDF.

- ``spearman_vs_lr``: mean Spearman over seeds against the learning rate (log scale), one panel
  per experiment family and one line per method, with the standard deviation over seeds as
  error bars.
- ``improvement``: AdamW-influence's relative improvement over SGD-influence against the
  learning rate, one line per experiment family.
- ``scatter_<family>_lr<lr>_seed<seed>``: predicted against true leave-one-out effect of one
  test point, a panel per method, one figure per run in ``scatter.csv``.

Only ``spearman.csv`` and ``scatter.csv`` are read, so redrawing takes about a second.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from attrbench.io import FIGURE_METADATA  # noqa: E402
from attrbench.reporting.aggregate import IMPROVED_METHOD, experiment_columns  # noqa: E402
from attrbench.reporting.tables import SCATTER_CSV, TABLE_CSV  # noqa: E402

log = logging.getLogger(__name__)

FORMATS = ("png", "pdf")
PANEL_COLUMNS = 3


def draw_figures(report_dir: str | Path, figure_dir: str | Path) -> list[Path]:
    """Draw every figure from the tables in ``report_dir`` into ``figure_dir``; return the files written.

    Raises:
        FileNotFoundError: When ``report_dir`` has no ``spearman.csv``.
    """
    report_dir, figure_dir = Path(report_dir), Path(figure_dir)
    table_path = report_dir / TABLE_CSV
    if not table_path.is_file():
        raise FileNotFoundError(f"{table_path} not found; run `attrbench report DIR` first")
    table = pd.read_csv(table_path, dtype={"seeds": str, "missing_seeds": str})
    figure_dir.mkdir(parents=True, exist_ok=True)

    written = []
    if table.empty:
        log.warning("%s has no rows; no figures drawn", table_path)
        return written
    written += _save(plot_spearman_vs_lr(table), figure_dir / "spearman_vs_lr")
    improvement = plot_improvement(table)
    if improvement is None:
        log.warning("no experiment has both SGD- and AdamW-influence; the improvement figure is skipped")
    else:
        written += _save(improvement, figure_dir / "improvement")

    written += _draw_scatters(report_dir / SCATTER_CSV, figure_dir)
    return written


def _draw_scatters(scatter_path: Path, figure_dir: Path) -> list[Path]:
    """Draw one scatter figure per run in ``scatter.csv``."""
    scatter = pd.read_csv(scatter_path) if scatter_path.is_file() else pd.DataFrame()
    if scatter.empty:
        log.warning("%s is missing or empty; no scatter figure drawn", scatter_path)
        return []
    written = []
    for _, frame in scatter.groupby("run_dir", sort=False):
        first = frame.iloc[0]
        name = f"{_family_label(first)} lr{first['lr']:g} seed{first['seed']}"
        written += _save(plot_scatter(frame), figure_dir / f"scatter_{_slug(name)}")
    return written


def _families(frame: pd.DataFrame):
    """Yield (label, rows) per experiment family: setting, variant, optimizer and extra config keys."""
    if frame.empty:
        return
    columns = experiment_columns(frame.columns)
    for values, rows in frame.groupby(columns, sort=False, dropna=False):
        yield _label(dict(zip(columns, values))), rows


def _family_label(row: pd.Series) -> str:
    return _label({column: row[column] for column in experiment_columns(row.index)})


def _label(family: dict) -> str:
    parts = [str(family.pop("setting")), str(family.pop("variant")), str(family.pop("optimizer"))]
    parts += [f"{key}={value}" for key, value in family.items()]
    return " | ".join(parts)


# Maximum length of a figure file's stem. File systems allow 255 bytes per name, and the atomic writer adds a
# temporary prefix and suffix around the final name.
MAX_SLUG_LENGTH = 120


def _slug(label: str) -> str:
    """Turn a figure label into a file-name stem of at most ``MAX_SLUG_LENGTH`` characters.

    A longer stem (a sweep that varies many config keys) keeps its start and ends in a short
    SHA-256 of the whole label, so different labels still get different files.
    """
    slug = re.sub(r"[^A-Za-z0-9=-]+", "_", label).strip("_")
    if len(slug) <= MAX_SLUG_LENGTH:
        return slug
    digest = hashlib.sha256(label.encode()).hexdigest()[:12]
    return f"{slug[: MAX_SLUG_LENGTH - len(digest) - 1]}_{digest}"


def plot_spearman_vs_lr(table: pd.DataFrame) -> plt.Figure:
    """Plot mean Spearman against learning rate: one panel per experiment family, a line per method."""
    families = list(_families(table))
    columns = min(PANEL_COLUMNS, len(families))
    rows = math.ceil(len(families) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis, (label, frame) in zip(axes.flat, families):
        for method, lines in frame.groupby("method", sort=False):
            lines = lines.sort_values("lr")
            axis.errorbar(lines["lr"], lines["spearman_mean"], yerr=lines["spearman_std"].fillna(0.0),
                          marker="o", capsize=3, label=method)
        axis.set_xscale("log")
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("learning rate")
        axis.set_ylabel("mean Spearman (± std over seeds)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(families):]:
        axis.set_visible(False)
    figure.tight_layout()
    return figure


def plot_improvement(table: pd.DataFrame) -> plt.Figure | None:
    """Plot AdamW-influence's relative improvement over SGD-influence in percent, a line per family.

    Returns:
        The figure, or None when no experiment has both methods.
    """
    rows = table[(table["method"] == IMPROVED_METHOD) & table["relative_improvement"].notna()]
    if rows.empty:
        return None
    figure, axis = plt.subplots(figsize=(5.2, 3.6))
    for label, frame in _families(rows):
        frame = frame.sort_values("lr")
        axis.plot(frame["lr"], 100 * frame["relative_improvement"], marker="o", label=label)
    axis.axhline(0, color="0.5", lw=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("AdamW- over SGD-influence (%)")
    axis.set_title("relative improvement in mean Spearman", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_scatter(frame: pd.DataFrame) -> plt.Figure:
    """Plot predicted against true leave-one-out effect for one run's test point, a panel per method.

    Each panel has its own y scale, because the methods' predictions can differ in magnitude by
    orders while their ranks (all that Spearman compares) are close.
    """
    first = frame.iloc[0]
    methods = list(dict.fromkeys(frame["method"]))
    figure, axes = plt.subplots(1, len(methods), figsize=(3.8 * len(methods), 3.6), squeeze=False, sharex=True)
    limit = np.abs(frame["true_delta"]).max()
    for axis, method, color in zip(axes[0], methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        points = frame[frame["method"] == method]
        # Pearson correlation of average ranks is Spearman's; pandas' method="spearman" would import scipy.
        spearman = points["predicted_delta"].rank().corr(points["true_delta"].rank())
        axis.scatter(points["true_delta"], points["predicted_delta"], s=9, alpha=0.6, color=color)
        axis.axhline(0, color="0.8", lw=0.8)
        axis.axvline(0, color="0.8", lw=0.8)
        axis.ticklabel_format(style="sci", scilimits=(-2, 3))
        axis.set_title(f"{method} (Spearman {spearman:.3f})", fontsize=9)
        axis.set_xlabel("true delta (leave-one-out)")
        axis.set_ylabel("predicted delta")
    if limit > 0:
        axes[0][0].set_xlim(-1.1 * limit, 1.1 * limit)
    figure.suptitle(f"{_family_label(first)}: lr {first['lr']:g}, seed {first['seed']}, "
                    f"test point {first['test_point']}", fontsize=10)
    figure.tight_layout()
    return figure


def _save(figure: plt.Figure, stem: Path) -> list[Path]:
    """Save ``figure`` as ``stem.png`` and ``stem.pdf``, each through a temporary file and a rename."""
    paths = []
    for extension in FORMATS:
        path = stem.parent / f"{stem.name}.{extension}"
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{extension}")
        os.close(handle)
        try:
            figure.savefig(temporary, dpi=150, metadata=FIGURE_METADATA)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        paths.append(path)
    plt.close(figure)
    return paths
