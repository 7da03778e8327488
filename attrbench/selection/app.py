"""The Hydra application behind ``attrbench select``."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from attrbench.app import CONFIG_DIR, config_errors_reported, interruptible
from attrbench.reporting.sweep import record_failure
from attrbench.selection.runner import run_selection


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="select")
def select_app(cfg: DictConfig) -> float | None:
    """Run one selection job in the Hydra run directory and return its final test loss.

    A failing job writes ``failed.json`` into its directory. In a sweep it returns None, so that
    the other jobs still run.
    """
    hydra_config = HydraConfig.get()
    output_dir = hydra_config.runtime.output_dir
    sweep_job = hydra_config.mode == RunMode.MULTIRUN
    with (
        config_errors_reported("attrbench select"),
        interruptible(),
        record_failure(output_dir, list(hydra_config.overrides.task), continue_on_error=sweep_job),
    ):
        return run_selection(cfg, output_dir)["test_loss"]
    return None
