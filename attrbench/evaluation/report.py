"""Write a run's correlation tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attrbench.io import write_text


def format_markdown(table: pd.DataFrame, floatfmt: str = ".4f") -> str:
    return table.to_markdown(index=False, floatfmt=floatfmt) + "\n"


def write_table(table: pd.DataFrame, directory: Path, stem: str) -> None:
    """Write ``stem.csv`` and ``stem.md`` atomically."""
    write_text(directory / f"{stem}.csv", table.to_csv(index=False))
    write_text(directory / f"{stem}.md", format_markdown(table))
