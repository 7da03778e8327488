"""Draw the error-against-learning-rate-and-length figure and its tables from a finished sweep.

Usage:
    python scripts/error_sweep_figure.py SWEEP_DIR [--out DIR]
    python scripts/error_sweep_figure.py SWEEP_DIR --seeds FILE.md

SWEEP_DIR is a Hydra multirun directory of ``attrbench run -m +analysis=error ...`` (each run
directory contains an error_summary.csv). The tables and the figure go to --out (default
SWEEP_DIR). With --seeds, write instead the mean and standard deviation over the sweep's runs
of each method's Spearman and of the error columns, as a Markdown table (and a CSV beside it).
"""

from __future__ import annotations

import argparse
import logging

from pathlib import Path

from attrbench.analysis.figures import draw_error_figures, seed_summary
from attrbench.evaluation.report import format_markdown
from attrbench.io import write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="multirun directory whose runs wrote error_summary.csv")
    parser.add_argument("--out", default=None, help="output directory (default: the sweep directory)")
    parser.add_argument("--seeds", default=None, help="write the over-seeds summary to this .md file instead")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if arguments.seeds:
        table = seed_summary(arguments.sweep_dir)
        path = Path(arguments.seeds)
        write_text(path, format_markdown(table, floatfmt=".4g"))
        write_text(path.with_suffix(".csv"), table.to_csv(index=False))
        print(path)
        return
    for path in draw_error_figures(arguments.sweep_dir, arguments.out):
        print(path)


if __name__ == "__main__":
    main()
