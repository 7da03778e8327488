"""Argument parsing for ``attrbench report`` and ``attrbench figures``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("attrbench.reporting")

REPORT_SUBDIR = "report"
FIGURE_SUBDIR = "figures"


def report_main(argv: list[str]) -> int:
    """Run ``attrbench report DIR``: write the tables and figures, print the report, return the exit status."""
    parser = argparse.ArgumentParser(
        prog="attrbench report",
        description="Gather every run under DIR (single runs and sweeps, any setting) into one table "
        "averaged over seeds, write it as CSV and Markdown, print it, and draw the figures. Runs with "
        "+analysis=error add the error-against-lr-and-T tables, and `attrbench select` runs add the "
        "selection tables.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="a run, a sweep, or a directory above them")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help=f"directory for the tables and figures (default: DIR/{REPORT_SUBDIR})")
    parser.add_argument("--test-point", type=int, default=0, metavar="N",
                        help="test point shown in the predicted-vs-true scatter (default: 0)")
    parser.add_argument("--scatter-run", action="append", default=None, metavar="RUN",
                        help="run directory, relative to DIR, to draw the scatter from; repeatable "
                        "(default: per setting, the run with the largest learning rate and smallest seed)")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    arguments = parser.parse_args(argv)
    _configure_logging()

    from attrbench.io import write_text
    from attrbench.reporting.extras import has_extra_sections, write_extra_sections
    from attrbench.reporting.tables import REPORT_MD, build_report, format_report, write_report

    output = arguments.output or arguments.directory / REPORT_SUBDIR
    started = time.perf_counter()
    parts = []
    try:
        report = build_report(arguments.directory, arguments.test_point, arguments.scatter_run)
        write_report(report, output)
        parts.append(format_report(report))
    except (FileNotFoundError, ValueError) as error:
        # A directory of selection runs or error summaries alone still gets their sections.
        if not (isinstance(error, FileNotFoundError) and has_extra_sections(arguments.directory)):
            print(f"attrbench report: {error}", file=sys.stderr)
            return 1
    parts += write_extra_sections(arguments.directory, output)
    text = "\n".join(parts)
    write_text(output / REPORT_MD, text)
    print(text)
    log.info("wrote the report tables to %s in %.2f s", output, time.perf_counter() - started)
    if not arguments.no_figures:
        _draw(output, output / FIGURE_SUBDIR)
    return 0


def figures_main(argv: list[str]) -> int:
    """Run ``attrbench figures DIR``: redraw the figures from saved report tables, return the exit status."""
    parser = argparse.ArgumentParser(
        prog="attrbench figures",
        description="Redraw every report figure (PNG and PDF) from the tables that `attrbench report` "
        "saved, without reading any run or model.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR",
                        help=f"the directory given to `attrbench report` (its {REPORT_SUBDIR}/ "
                        "subdirectory is read), or the report directory itself")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help=f"directory for the figures (default: {FIGURE_SUBDIR}/ in the report directory)")
    arguments = parser.parse_args(argv)
    _configure_logging()

    if not arguments.directory.is_dir():
        print(f"attrbench figures: {arguments.directory} is not a directory", file=sys.stderr)
        return 1
    report_dir = find_report_directory(arguments.directory)
    if report_dir is None:
        print(f"attrbench figures: no report tables in {arguments.directory} or "
              f"{arguments.directory / REPORT_SUBDIR}; run `attrbench report {arguments.directory}` first",
              file=sys.stderr)
        return 1
    import pandas as pd

    try:
        _draw(report_dir, arguments.output or report_dir / FIGURE_SUBDIR)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, ValueError) as error:
        print(f"attrbench figures: the report tables in {report_dir} cannot be read ({error}); "
              f"rerun `attrbench report` on the run directory to rewrite them", file=sys.stderr)
        return 1
    return 0


def find_report_directory(directory: Path) -> Path | None:
    """Return ``directory`` or its ``report/`` subdirectory, whichever contains report tables, else None."""
    from attrbench.reporting.tables import RUNS_CSV, TABLE_CSV

    # A run directory also contains spearman.csv; runs.csv is what marks a report directory.
    from attrbench.reporting.extras import BEST_HORIZON_CSV, ERROR_RUNS_CSV

    for candidate in (directory, directory / REPORT_SUBDIR):
        if (candidate / TABLE_CSV).is_file() and (candidate / RUNS_CSV).is_file():
            return candidate
        if (candidate / ERROR_RUNS_CSV).is_file() or (candidate / BEST_HORIZON_CSV).is_file():
            return candidate
    return None


def _draw(report_dir: Path, figure_dir: Path) -> None:
    from attrbench.reporting.extras import draw_extra_figures
    from attrbench.reporting.figures import draw_figures

    from attrbench.reporting.tables import TABLE_CSV

    started = time.perf_counter()
    figure_dir.mkdir(parents=True, exist_ok=True)
    written = draw_figures(report_dir, figure_dir) if (report_dir / TABLE_CSV).is_file() else []
    written += draw_extra_figures(report_dir, figure_dir)
    log.info("drew %d figure files in %s in %.2f s", len(written), figure_dir, time.perf_counter() - started)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")


COMMANDS = {"report": report_main, "figures": figures_main}
