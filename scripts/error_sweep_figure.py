"""Draw the error-against-learning-rate-and-length figure and its tables from a finished sweep.

Usage:
    python scripts/error_sweep_figure.py SWEEP_DIR [--out DIR]

SWEEP_DIR is a Hydra multirun directory of ``attrbench run -m +analysis=error ...`` (each run
directory holds an error_summary.csv). The tables and the figure go to --out (default SWEEP_DIR).
"""

from __future__ import annotations

import argparse
import logging

from attrbench.analysis.figures import draw_error_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="multirun directory whose runs wrote error_summary.csv")
    parser.add_argument("--out", default=None, help="output directory (default: the sweep directory)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in draw_error_figures(arguments.sweep_dir, arguments.out):
        print(path)


if __name__ == "__main__":
    main()
