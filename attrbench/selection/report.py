"""Aggregate selection runs into the horizon-by-learning-rate table and its figures.

Every run of ``attrbench select`` writes ``selection.json``; :func:`write_selection_report` reads all
of them under a directory (for example a Hydra multirun directory) and writes

* ``selection.csv`` / ``selection.md``: final test loss and accuracy, mean and standard deviation
  over seeds, per setting, epochs, fraction, learning rate, method and horizon K;
* ``best_horizon.csv`` / ``best_horizon.md``: per learning rate, the best horizon (offline counts
  as K = T, the number of steps) next to the baselines;
* ``test_loss_vs_horizon.png``: test loss against K, one panel per learning rate (and fraction),
  with offline, no selection and random drop for comparison;
* ``best_horizon_vs_lr.png``: the best K against the learning rate.

The functions are the entry points for other reports: :func:`collect_results`,
:func:`selection_table`, :func:`best_horizons`, :func:`plot_loss_vs_horizon`,
:func:`plot_best_horizon`, :func:`failed_jobs`. ``attrbench select-report DIR`` runs :func:`main`,
which also prints the failed jobs that the tables leave out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from attrbench.evaluation.report import format_markdown, write_table  # noqa: E402
from attrbench.io import FIGURE_METADATA, read_json  # noqa: E402
from attrbench.reporting.collect import (  # noqa: E402
    FAILED, FAILED_FILE, SELECTION_FILE, RunRecord, find_runs,
)

log = logging.getLogger(__name__)

GROUP_KEYS = ["setting", "epochs", "fraction", "lr", "method", "horizon"]
PANEL_KEYS = ["setting", "epochs", "fraction", "lr"]
METHOD_ORDER = {"none": 0, "random": 1, "lookahead": 2, "offline": 3}
METRICS = ("test_loss", "test_accuracy", "validation_loss")


def collect_results(root: str | Path) -> pd.DataFrame:
    """Read every ``selection.json`` under ``root`` into one row each.

    A configuration and seed found twice (a rerun into the same directory) keeps the file that
    sorts last by path, with a warning. A directory that also contains ``failed.json`` is left
    out: its job failed, and its ``selection.json`` is left from an earlier attempt.

    Raises:
        FileNotFoundError: If ``root`` does not exist or contains no ``selection.json`` of a job
            that did not fail.
        NotADirectoryError: If ``root`` is a file.
    """
    _check_directory(root)
    paths = selection_paths(root)
    if not paths:
        raise FileNotFoundError(
            f"no selection.json under {root}; run `attrbench select -m ... hydra.sweep.dir={root}` first"
        )
    frame = pd.DataFrame([{**read_json(path), "path": str(path)} for path in paths])
    frame["horizon"] = frame["horizon"].astype("Int64")
    duplicated = frame.duplicated(GROUP_KEYS + ["seed"], keep="last")
    if duplicated.any():
        log.warning(
            "select-report: %d runs repeat a configuration and seed; keeping the last of each: %s",
            int(duplicated.sum()),
            ", ".join(frame.loc[duplicated, "path"]),
        )
        frame = frame[~duplicated]
    return frame.reset_index(drop=True)


def _check_directory(root: str | Path) -> None:
    """Raise FileNotFoundError or NotADirectoryError, naming ``root``, unless it is a directory."""
    root = Path(root)
    advice = "pass the hydra.sweep.dir of an `attrbench select -m` sweep"
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; {advice}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory; {advice}")


def selection_paths(root: str | Path) -> list[Path]:
    """List the ``selection.json`` files under ``root``, except in directories of failed jobs."""
    paths = sorted(Path(root).rglob(SELECTION_FILE))
    return [path for path in paths if not (path.parent / FAILED_FILE).exists()]


def selection_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation (ddof 1) over seeds of every metric, per configuration."""
    grouped = results.groupby(GROUP_KEYS, dropna=False, sort=False)
    table = grouped.agg(
        label=("method", "first"),
        seeds=("seed", "nunique"),
        num_steps=("num_steps", "first"),
        **{f"{metric}_{stat}": (metric, stat) for metric in METRICS for stat in ("mean", "std")},
        selection_seconds_mean=("selection_seconds", "mean"),
    ).reset_index()
    table["label"] = [_label(method, horizon) for method, horizon in zip(table["method"], table["horizon"])]
    order = table["method"].map(METHOD_ORDER).fillna(len(METHOD_ORDER))
    table = table.assign(_order=order, _horizon=table["horizon"].fillna(-1))
    table = table.sort_values(["setting", "epochs", "fraction", "lr", "_order", "_horizon"])
    return table.drop(columns=["_order", "_horizon"]).reset_index(drop=True)


def _label(method: str, horizon) -> str:
    return f"K={int(horizon)}" if method == "lookahead" else method


def best_horizons(table: pd.DataFrame) -> pd.DataFrame:
    """Per learning rate: the lowest mean test loss over look-ahead horizons and offline.

    Offline counts as horizon T (``num_steps``), the look-ahead of a sample to the end of the run.
    """
    rows = []
    for keys, panel in table.groupby(PANEL_KEYS, sort=True):
        lookahead = panel[panel["method"] == "lookahead"]
        offline = panel[panel["method"] == "offline"]
        candidates = pd.concat([lookahead, offline])
        if candidates.empty:
            continue
        best = candidates.loc[candidates["test_loss_mean"].idxmin()]
        best_online = lookahead.loc[lookahead["test_loss_mean"].idxmin()] if not lookahead.empty else None
        rows.append(
            {
                **dict(zip(PANEL_KEYS, keys)),
                "num_steps": int(panel["num_steps"].iloc[0]),
                "best": best["label"],
                "best_horizon": int(best["num_steps"] if best["method"] == "offline" else best["horizon"]),
                "best_test_loss": best["test_loss_mean"],
                "best_lookahead": best_online["label"] if best_online is not None else None,
                "best_lookahead_test_loss": best_online["test_loss_mean"]
                if best_online is not None
                else np.nan,
                **{
                    f"{method}_test_loss": _mean_of(panel, method) for method in ("offline", "none", "random")
                },
            }
        )
    return pd.DataFrame(rows)


def _mean_of(panel: pd.DataFrame, method: str) -> float:
    rows = panel[panel["method"] == method]
    return float(rows["test_loss_mean"].iloc[0]) if len(rows) else np.nan


def plot_loss_vs_horizon(table: pd.DataFrame, path: str | Path) -> None:
    """Test loss against K, one panel per learning rate, one row of panels per fraction.

    Look-ahead horizons are evenly spaced categories, offline sits after the largest K, and the
    no-selection and random-drop baselines are horizontal lines with a band of one standard
    deviation over seeds.
    """
    panels = list(table.groupby(PANEL_KEYS, sort=True))
    fractions = sorted(table["fraction"].unique())
    rates = sorted(table["lr"].unique(), reverse=True)
    figure, axes = plt.subplots(
        len(fractions), len(rates), figsize=(3.4 * len(rates), 3.0 * len(fractions)), squeeze=False
    )
    horizons = sorted(int(k) for k in table["horizon"].dropna().unique())
    positions = {k: i for i, k in enumerate(horizons)}
    offline_position = len(horizons)
    for keys, panel in panels:
        settings = dict(zip(PANEL_KEYS, keys))
        axis = axes[fractions.index(settings["fraction"])][rates.index(settings["lr"])]
        lookahead = panel[panel["method"] == "lookahead"].sort_values("horizon")
        if not lookahead.empty:
            axis.errorbar(
                [positions[int(k)] for k in lookahead["horizon"]],
                lookahead["test_loss_mean"],
                yerr=lookahead["test_loss_std"].fillna(0),
                marker="o",
                capsize=3,
                label="look-ahead K",
            )
        offline = panel[panel["method"] == "offline"]
        if not offline.empty:
            axis.errorbar(
                [offline_position],
                offline["test_loss_mean"],
                yerr=offline["test_loss_std"].fillna(0),
                marker="s",
                color="tab:red",
                capsize=3,
                linestyle="none",
                label="offline",
            )
        for method, style, color in (("none", "--", "black"), ("random", ":", "tab:gray")):
            rows = panel[panel["method"] == method]
            if rows.empty:
                continue
            mean, std = (
                float(rows["test_loss_mean"].iloc[0]),
                float(np.nan_to_num(rows["test_loss_std"].iloc[0])),
            )
            axis.axhline(mean, linestyle=style, color=color, lw=1, label=method)
            axis.axhspan(mean - std, mean + std, color=color, alpha=0.08)
        axis.set_xticks(range(len(horizons) + 1), [str(k) for k in horizons] + ["offline"], fontsize=8)
        axis.set_title(f"lr {settings['lr']:g}, drop {settings['fraction']:g}", fontsize=9)
        axis.set_xlabel("horizon K")
        axis.set_ylabel("final test loss")
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=130, metadata=FIGURE_METADATA)
    plt.close(figure)


def plot_best_horizon(best: pd.DataFrame, path: str | Path) -> None:
    """Best horizon against learning rate (log x, symlog y). Offline is drawn at K = T."""
    figure, axis = plt.subplots(figsize=(4.6, 3.4))
    for fraction, rows in best.groupby("fraction", sort=True):
        rows = rows.sort_values("lr")
        line = axis.plot(
            rows["lr"], rows["best_horizon"], marker="o", label=f"best of K and offline, drop {fraction:g}"
        )
        online = rows["best_lookahead"].str.removeprefix("K=").astype(float)
        axis.plot(
            rows["lr"],
            online,
            marker="x",
            linestyle=":",
            color=line[0].get_color(),
            label=f"best look-ahead K, drop {fraction:g}",
        )
    if len(best):
        steps = int(best["num_steps"].max())
        ticks = sorted({0, steps, *(2**power for power in range(int(np.log2(steps)) + 1))})
        axis.axhline(steps, color="0.7", lw=0.8)
        axis.set_yscale("symlog", linthresh=1)
        axis.set_yticks(ticks, [f"T={steps}" if tick == steps else str(tick) for tick in ticks], fontsize=7)
        axis.minorticks_off()
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("best horizon K (lowest mean test loss)")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=130, metadata=FIGURE_METADATA)
    plt.close(figure)


def write_selection_report(root: str | Path, output: str | Path | None = None) -> pd.DataFrame:
    """Write the tables and figures for the runs under ``root`` into ``output`` (default ``root``)."""
    output = Path(output or root)
    table = selection_table(collect_results(root))
    best = best_horizons(table)
    write_table(table, output, "selection")
    write_table(best, output, "best_horizon")
    plot_loss_vs_horizon(table, output / "test_loss_vs_horizon.png")
    if len(best):
        plot_best_horizon(best, output / "best_horizon_vs_lr.png")
    return table


def failed_jobs(root: str | Path) -> pd.DataFrame:
    """List the failed selection jobs under ``root``: ``run_dir`` (relative to ``root``) and ``message``.

    A failed job is a job directory with ``failed.json``. Failed ``attrbench run`` jobs, whose
    Hydra config has no ``selection`` node, are not listed. A failed job without a readable
    Hydra config is listed, because nothing shows which command ran it.
    """
    root = Path(root)
    rows = [
        {"run_dir": os.path.relpath(record.directory, root), "message": record.message}
        for record in find_runs(root)
        if record.status == FAILED and _is_selection_job(record)
    ]
    return pd.DataFrame(rows, columns=["run_dir", "message"])


def _is_selection_job(record: RunRecord) -> bool:
    if (record.directory / SELECTION_FILE).exists() or not record.config:
        return True
    return any(key.startswith("selection.") for key in record.config)


def _print_failed_jobs(root: str | Path, file) -> None:
    failed = failed_jobs(root)
    if failed.empty:
        return
    jobs = "job" if len(failed) == 1 else "jobs"
    print(f"## Runs not counted\n\n{len(failed)} failed {jobs}, left out of the table:\n", file=file)
    print(format_markdown(failed), file=file)


def main(argv: list[str] | None = None) -> int:
    """``attrbench select-report DIR [--output OUT]``."""
    parser = argparse.ArgumentParser(
        prog="attrbench select-report",
        description="Aggregate the selection.json files under DIR into tables and figures.",
    )
    parser.add_argument("directory", help="directory searched recursively for selection.json")
    parser.add_argument("--output", default=None, help="where the tables and figures go (default: DIRECTORY)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        table = write_selection_report(arguments.directory, arguments.output)
    except (FileNotFoundError, NotADirectoryError) as error:
        print(f"attrbench select-report: {error}", file=sys.stderr)
        if Path(arguments.directory).is_dir():
            _print_failed_jobs(arguments.directory, sys.stderr)
        return 1
    columns = [
        "lr",
        "fraction",
        "label",
        "seeds",
        "test_loss_mean",
        "test_loss_std",
        "test_accuracy_mean",
        "test_accuracy_std",
    ]
    print(format_markdown(table[columns]))
    _print_failed_jobs(arguments.directory, sys.stdout)
    return 0
