"""The Hydra application behind ``attrbench run``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from attrbench.errors import ConfigError, SourceNotFoundError
from attrbench.memory import MemoryBudgetError
from attrbench.pipeline import run_experiment
from attrbench.reporting.sweep import record_failure


# The configs are the repository's top-level conf/ directory, found relative to this file, so
# attrbench runs from a source checkout or an editable install (pip install -e .).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger(__name__)


class RunInterrupted(BaseException):
    """SIGTERM arrived during a run (a BaseException, like KeyboardInterrupt, so nothing swallows it)."""


def _raise_interrupted(signum, frame) -> None:
    raise RunInterrupted(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into one log line and exit status 130 or 143, without a traceback.

    Finished stages and ground-truth chunks are already on disk, so the warning instructs the user
    to rerun the same command. A SIGTERM handler that someone else installed (a cluster launcher's,
    say) is left in place.
    """
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    except (KeyboardInterrupt, RunInterrupted) as error:
        name, status = ("SIGTERM", 143) if isinstance(error, RunInterrupted) else ("SIGINT", 130)
        log.warning("run interrupted by %s. Finished stages and ground-truth chunks are kept in cache_dir; "
                    "rerun the same command to resume", name)
        raise SystemExit(status) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def config_errors_reported(command: str) -> Iterator[None]:
    """Print a config error as one line on stderr and exit with status 1, without a traceback.

    Config errors are a :class:`ConfigError`, a :class:`MemoryBudgetError` (a config whose
    memory plan exceeds ``memory.budget_gb``) and a :class:`SourceNotFoundError` (data or
    weights that the config names but that cannot be found). The run directory's
    ``failed.json`` keeps the message. Other exceptions keep Hydra's report with a traceback,
    because they are not the user's input.
    """
    try:
        yield
    except ConfigError as error:
        print(f"{command}: invalid config: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except (MemoryBudgetError, SourceNotFoundError) as error:
        print(f"{command}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def run_app(cfg: DictConfig) -> float | None:
    """Run one experiment in the Hydra run directory; return AdamW-influence's mean Spearman.

    Without AdamW-influence in ``influence.methods``, the last method's mean Spearman is returned.

    A ground-truth shard job that did not evaluate, because other shards are unfinished, returns None.
    So does a failing sweep job, after writing ``failed.json``, so that the other jobs still run.
    """
    hydra_config = HydraConfig.get()
    output_dir = hydra_config.runtime.output_dir
    sweep_job = hydra_config.mode == RunMode.MULTIRUN
    with (
        config_errors_reported("attrbench run"),
        interruptible(),
        record_failure(output_dir, list(hydra_config.overrides.task), continue_on_error=sweep_job),
    ):
        table = run_experiment(cfg, output_dir)
        if table is None:  # a ground-truth shard job whose other shards are not finished yet
            return None
        methods = table.set_index("method")["spearman_mean"]
        return float(methods.get("adamw_influence", methods.iloc[-1]))
    return None
