"""Find the runs under a directory and read their results.

A run directory is one that ``attrbench run`` wrote into: it contains ``summary.json`` (finished),
``failed.json`` (the job raised) or Hydra's ``.hydra/`` folder (started). Single runs and sweep
jobs look the same, so one walk finds both, at any depth. Two kinds of finished job have no
Spearman table: a ground-truth shard job that left the evaluation to the job finishing the last
shard (``summary.json`` with status ``waiting_for_shards``), and a run of ``attrbench select``
(``selection.json``). They are listed, but neither counted nor treated as failures. A finished run is read from
``summary.json`` (setting, data variant, optimizer, learning rate, seed), ``spearman.csv`` (one row
per influence method) and ``config.yaml`` (the resolved config, used to tell experiments apart).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
TABLE_FILE = "spearman.csv"
CONFIG_FILE = "config.yaml"
FAILED_FILE = "failed.json"
SELECTION_FILE = "selection.json"
HYDRA_DIR = ".hydra"

COMPLETE, FAILED, INCOMPLETE, DUPLICATE = "complete", "failed", "incomplete", "duplicate"
WAITING_FOR_SHARDS, SELECTION = "waiting_for_shards", "selection"
STATUSES = (COMPLETE, FAILED, INCOMPLETE, DUPLICATE, WAITING_FOR_SHARDS, SELECTION)
# Statuses of a job that did not do its work: a sweep with such a job exits with status 1.
UNFINISHED = (FAILED, INCOMPLETE)

# Config keys that never separate two experiments. The table averages over the seed, and the
# learning rate and setting name have their own columns. The data source comes from summary.json,
# where "auto" is already resolved. The other keys change how a run executes, not its results.
IGNORED_KEYS = frozenset({
    "seed", "optimizer.lr", "setting.name", "data.source", "data.root", "data.download",
    "cache_dir", "progress", "device", "deterministic", "influence.methods", "influence.query_chunk_size",
    "groundtruth.chunk_size", "groundtruth.num_shards", "groundtruth.shard", "trajectory.checkpoint_every",
    "train.micro_batch_size", "evaluation.scatter_test_points",
})
IGNORED_PREFIXES = ("memory.", "hydra.")

# The columns of runs.csv; the distinguishing config keys go between "optimizer" and "lr".
RUN_COLUMNS = ["run_dir", "setting", "variant", "optimizer", "lr", "seed", "method",
               "spearman_mean", "spearman_std", "test_points", "undefined", "finished_at"]
PROBLEM_COLUMNS = ["run_dir", "status", "setting", "lr", "seed", "overrides", "message"]


@dataclass
class RunRecord:
    """One run directory and what could be read from it."""

    directory: Path
    status: str
    message: str = ""
    summary: dict = field(default_factory=dict)
    table: pd.DataFrame | None = None
    config: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    finished_at: float = 0.0
    superseded_methods: set[str] = field(default_factory=set)  # methods a later run of the same experiment replaces

    @property
    def variant(self) -> str:
        """The data and model variant; runs without a ``variant`` field fall back to the data source."""
        return str(self.summary.get("variant") or self.summary.get("data_source") or "")


def find_runs(root: str | Path) -> list[RunRecord]:
    """Read every run directory under ``root`` (``root`` itself included), in natural path order.

    Raises:
        FileNotFoundError: When ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass the directory of a run or a sweep")
    return [read_run(directory) for directory in sorted(_run_directories(root), key=_natural_key)]


def _run_directories(root: Path) -> list[Path]:
    found = []
    for current, subdirectories, _ in os.walk(root):
        current = Path(current)
        if is_run_directory(current):
            found.append(current)
            subdirectories.clear()
        else:
            # Hidden folders contain caches and Hydra metadata, never runs.
            subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
    return found


def is_run_directory(directory: Path) -> bool:
    return any((directory / name).exists() for name in (SUMMARY_FILE, FAILED_FILE, HYDRA_DIR))


def _natural_key(path: Path) -> list:
    """Sort key that puts sweep job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def read_run(directory: Path) -> RunRecord:
    """Read one run directory; a missing or unreadable file makes the run failed or incomplete."""
    if (directory / FAILED_FILE).exists():
        return _read_failed_run(directory)
    record = RunRecord(directory, INCOMPLETE, config=_read_config(directory),
                       overrides=_read_overrides(directory))

    if (directory / SELECTION_FILE).exists():
        record.status = SELECTION
        record.message = "a run of attrbench select; `attrbench select-report` reports it"
        return record

    summary_path, table_path = directory / SUMMARY_FILE, directory / TABLE_FILE
    if not summary_path.exists():
        record.message = "no summary.json: the run is still going or stopped before it finished"
        return record
    summary = _read_json(summary_path)
    if summary is None:
        record.message = "summary.json is not valid JSON"
        return record
    if summary.get("status") == WAITING_FOR_SHARDS:
        record.status, record.summary = WAITING_FOR_SHARDS, summary
        record.message = (f"computed ground-truth shard {summary.get('shard')} of {summary.get('num_shards')} "
                          "and left the evaluation to the job that finished the last shard")
        return record
    if not table_path.exists():
        record.message = "summary.json exists but spearman.csv is missing"
        return record
    try:
        table = pd.read_csv(table_path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        record.message = f"spearman.csv is unreadable: {error}"
        return record
    missing = {"method", "spearman_mean"} - set(table.columns)
    if missing:
        record.message = f"spearman.csv lacks the columns {', '.join(sorted(missing))}"
        return record

    missing = {"setting", "optimizer", "lr", "seed", "data_source"} - set(summary)
    if missing:
        record.message = f"summary.json lacks the fields {', '.join(sorted(missing))}"
        return record

    record.status, record.summary, record.table = COMPLETE, summary, table
    record.finished_at = _finished_at(summary, summary_path)
    return record


def _finished_at(summary: dict, summary_path: Path) -> float:
    """Return when the run finished, in Unix seconds.

    The time comes from ``summary.json``'s ``finished_at`` field (ISO 8601). Runs written before
    that field existed fall back to the file's modification time, which a git clone or a copy
    resets.
    """
    recorded = summary.get("finished_at")
    if recorded is not None:
        try:
            return datetime.fromisoformat(recorded).timestamp()
        except (TypeError, ValueError):
            log.warning("%s: finished_at=%r is not an ISO 8601 time; using the file's modification time",
                        summary_path, recorded)
    return summary_path.stat().st_mtime


def _read_failed_run(directory: Path) -> RunRecord:
    """Read a failed run from ``failed.json`` and Hydra's record of the attempt that failed.

    A failed rerun in a reused run directory leaves the earlier attempt's ``summary.json``,
    ``config.yaml`` and tables in place, so none of them is read. Hydra rewrites
    ``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` when each job starts, so they describe
    the failed attempt.
    """
    # NOTE: with hydra.output_subdir=null Hydra writes no .hydra/, so a .hydra/ left by an
    # earlier attempt would still supply the setting, lr and seed of the failure entry.
    hydra_config = _read_yaml_config(directory / HYDRA_DIR / CONFIG_FILE) or {}
    record = RunRecord(directory, FAILED, config=hydra_config, overrides=_read_overrides(directory))
    failure = _read_json(directory / FAILED_FILE) or {}
    error_type = failure.get("error_type", "error")
    record.message = f"{error_type}: {failure.get('message', 'unreadable failed.json')}"
    record.overrides = failure.get("overrides", record.overrides)
    return record


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("cannot read %s: %s", path, error)
        return None


def _read_config(directory: Path) -> dict:
    """Read the run's flattened config: the resolved ``config.yaml``, else Hydra's composed one."""
    for path in (directory / CONFIG_FILE, directory / HYDRA_DIR / CONFIG_FILE):
        config = _read_yaml_config(path)
        if config is not None:
            return config
    return {}


def _read_yaml_config(path: Path) -> dict | None:
    """Read a config file as a flattened dict; return None when it is missing or not valid YAML."""
    if not path.exists():
        return None
    try:
        return flatten_config(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as error:
        log.warning("cannot read %s: %s", path, error)
        return None


def _read_overrides(directory: Path) -> list[str]:
    path = directory / HYDRA_DIR / "overrides.yaml"
    if not path.exists():
        return []
    try:
        return [str(item) for item in yaml.safe_load(path.read_text()) or []]
    except yaml.YAMLError as error:
        log.warning("cannot read %s: %s", path, error)
        return []


def flatten_config(config: dict, prefix: str = "") -> dict:
    """Nested config as ``{"optimizer.lr": 0.001, ...}``; lists become JSON text so they compare and hash."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def distinguishing_keys(records: list[RunRecord]) -> list[str]:
    """Config keys whose value differs between finished runs of the same setting and variant.

    Each such key becomes a column of the report, so that runs which differ in anything but the
    seed (a weight decay, a removal rule, a number of samples) are never averaged together.
    Settings differ in most keys, so keys are compared only within one setting and variant.
    ``data_source`` from summary.json is compared like a config key.
    """
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record.status == COMPLETE and record.config:
            values = {**record.config, "data_source": record.summary.get("data_source")}
            groups.setdefault((record.summary.get("setting"), record.variant), []).append(values)

    keys = set()
    for configs in groups.values():
        for key in set().union(*configs):
            if _is_ignored(key):
                continue
            if len({json.dumps(config.get(key), default=str) for config in configs}) > 1:
                keys.add(key)
    return sorted(keys)


def _is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def mark_duplicates(records: list[RunRecord], extra_keys: list[str]) -> None:
    """Count each method of each configuration and seed once, from the run that finished last.

    Rerunning a sweep into the same directory tree leaves two runs of one experiment; counting
    both would count one seed twice. Duplicates are decided per influence method, so an earlier
    run keeps the methods that no later run computed. A run whose every method a later run
    replaces gets the status ``duplicate`` and is listed with the failed and incomplete runs.
    """
    covered: dict[str, set[str]] = {}
    latest: dict[str, RunRecord] = {}
    for record in sorted(records, key=lambda item: item.finished_at, reverse=True):
        if record.status != COMPLETE:
            continue
        identity = json.dumps(_run_identity(record, extra_keys), default=str)
        methods = set(_methods(record))
        seen = covered.setdefault(identity, set())
        record.superseded_methods = methods & seen
        if identity in latest and methods <= seen:
            record.status = DUPLICATE
            record.message = (f"same configuration and seed as {latest[identity].directory}, which "
                              "finished later; not counted")
            continue
        seen |= methods
        latest.setdefault(identity, record)


def _methods(record: RunRecord) -> list[str]:
    return [] if record.table is None else [str(method) for method in record.table["method"]]


def _run_identity(record: RunRecord, extra_keys: list[str]) -> dict:
    summary = record.summary
    values = {**record.config, "data_source": summary.get("data_source")}
    return {
        "setting": summary["setting"],
        "variant": record.variant,
        "optimizer": summary["optimizer"],
        **{key: values.get(key) for key in extra_keys},
        "lr": float(summary["lr"]),
        "seed": int(summary["seed"]),
    }


def runs_frame(records: list[RunRecord], extra_keys: list[str]) -> pd.DataFrame:
    """One row per finished run and influence method, with the run's mean Spearman over test points.

    Columns: ``run_dir``, ``setting``, ``variant``, ``optimizer``, the ``extra_keys``, ``lr``,
    ``seed``, ``method``, ``spearman_mean``, ``spearman_std`` (both over test points),
    ``test_points``, ``undefined``, ``finished_at`` (Unix seconds, see :func:`_finished_at`).
    """
    rows = []
    for record in records:
        if record.status != COMPLETE:
            continue
        identity = {"run_dir": str(record.directory), **_run_identity(record, extra_keys)}
        for entry in record.table.to_dict(orient="records"):
            if entry["method"] in record.superseded_methods:
                continue
            rows.append({
                **identity,
                "method": entry["method"],
                "spearman_mean": entry["spearman_mean"],
                "spearman_std": entry.get("spearman_std"),
                "test_points": entry.get("test_points"),
                "undefined": entry.get("undefined"),
                "finished_at": record.finished_at,
            })
    return pd.DataFrame(rows, columns=RUN_COLUMNS[:4] + list(extra_keys) + RUN_COLUMNS[4:])



def problems_frame(records: list[RunRecord]) -> pd.DataFrame:
    """List the runs that are not counted, one row each, with their status and the reason."""
    rows = [
        {
            "run_dir": str(record.directory),
            "status": record.status,
            "setting": record.summary.get("setting", record.config.get("setting.name")),
            "lr": record.summary.get("lr", record.config.get("optimizer.lr")),
            "seed": record.summary.get("seed", record.config.get("seed")),
            "overrides": " ".join(record.overrides),
            "message": record.message,
        }
        for record in records
        if record.status != COMPLETE
    ]
    return pd.DataFrame(rows, columns=PROBLEM_COLUMNS)

