"""The Hydra application behind ``attrbench run``."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from attrbench.pipeline import run_experiment
from attrbench.reporting.sweep import record_failure


# The configs are the repository's top-level conf/ directory, found relative to this file, so
# attrbench runs from a source checkout or an editable install (pip install -e .).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


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
    with record_failure(output_dir, list(hydra_config.overrides.task), continue_on_error=sweep_job):
        table = run_experiment(cfg, output_dir)
        if table is None:  # a ground-truth shard job whose other shards are not finished yet
            return None
        methods = table.set_index("method")["spearman_mean"]
        return float(methods.get("adamw_influence", methods.iloc[-1]))
    return None
