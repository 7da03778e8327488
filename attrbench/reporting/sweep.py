"""Keep a sweep going past a failing job, and exit with status 1 when the sweep ends.

Hydra's basic sweeper runs every job of a batch, then raises the first job's exception, which
skips the remaining batches and the end-of-sweep callbacks. ``attrbench run`` therefore catches
a sweep job's exception itself (:func:`record_failure`): it logs the traceback, writes
``failed.json`` into the job directory and lets the next job start. At the end of the sweep,
:class:`SweepStatusCallback` reads every job directory, writes ``sweep_status.json`` and logs
the jobs that failed or left no results, and ``attrbench run`` then exits with status 1. A single
run (no ``-m``) still raises its exception as before, after writing ``failed.json``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from attrbench.errors import ConfigError
from attrbench.io import write_json
from attrbench.reporting.collect import FAILED, FAILED_FILE, UNFINISHED, find_runs

log = logging.getLogger(__name__)

SWEEP_STATUS_FILE = "sweep_status.json"

# Job directories that did not finish in the last sweep of this process, set by SweepStatusCallback.
FAILED_JOBS: list[str] = []


@contextlib.contextmanager
def record_failure(run_dir: str | Path, overrides: list[str], *, continue_on_error: bool) -> Iterator[None]:
    """Write ``failed.json`` into ``run_dir`` when the body raises an ``Exception``.

    A stale ``failed.json`` from an earlier attempt in the same directory is removed first.
    ``KeyboardInterrupt`` and ``SystemExit`` always propagate.

    Args:
        run_dir: The job's output directory.
        overrides: The job's command-line overrides, stored so the job can be rerun alone.
        continue_on_error: Log the traceback and swallow the exception (sweep jobs), instead of
            re-raising it (single runs).
    """
    failed_path = Path(run_dir) / FAILED_FILE
    failed_path.unlink(missing_ok=True)
    try:
        yield
    except Exception as error:
        write_json(failed_path, {
            "status": FAILED,
            "error_type": type(error).__name__,
            "message": str(error),
            "overrides": list(overrides),
            "traceback": traceback.format_exc(),
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        if not continue_on_error:
            raise
        if isinstance(error, ConfigError):  # the user's input: the message names the key and the fix, so no traceback
            log.error("job failed with overrides: %s: invalid config: %s. The sweep continues.",
                      " ".join(overrides), error)
            return
        log.exception("job failed (%s) with overrides: %s. Details are in %s, and the sweep continues.",
                      type(error).__name__, " ".join(overrides), failed_path)


class SweepStatusCallback(Callback):
    """Check every job directory when a sweep ends, and write ``sweep_status.json``.

    Registered under ``hydra.callbacks`` in the top-level config. It reads the job directories
    rather than in-process state, so it also works with launchers that run jobs in other
    processes. Hydra turns an exception raised here into a warning, so the outcome goes to
    :data:`FAILED_JOBS`, which ``attrbench run`` and ``attrbench select`` turn into their exit status.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = find_runs(sweep_dir) if sweep_dir.is_dir() else []
        problems = [record for record in records if record.status in UNFINISHED]
        FAILED_JOBS[:] = [str(record.directory) for record in problems]
        if sweep_dir.is_dir():
            write_json(sweep_dir / SWEEP_STATUS_FILE, {
                "jobs": len(records),
                "complete": len(records) - len(problems),
                "not_complete": [{"run_dir": str(record.directory), "status": record.status,
                                  "message": record.message} for record in problems],
            })
        if not problems:
            log.info("sweep finished: all %d jobs complete in %s", len(records), sweep_dir)
            return
        lines = "".join(f"\n  {record.directory}: {record.status}: {record.message}" for record in problems)
        report_command = "attrbench select-report" if "selection" in config else "attrbench report"
        log.error(
            "sweep finished: %d of %d jobs did not finish:%s\nRerun a failed job with the overrides in its %s. "
            "`%s %s` tabulates the finished jobs.",
            len(problems), len(records), lines, FAILED_FILE, report_command, sweep_dir,
        )


def sweep_exit_status() -> int:
    """Return 1 when the last sweep in this process left a failed or incomplete job, else 0."""
    return 1 if FAILED_JOBS else 0
