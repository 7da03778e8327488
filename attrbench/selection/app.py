"""The Hydra application behind ``attrbench select``."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from attrbench.app import CONFIG_DIR
from attrbench.selection.runner import run_selection


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="select")
def select_app(cfg: DictConfig) -> float:
    """Run one selection job in the Hydra run directory and return its final test loss."""
    return run_selection(cfg, HydraConfig.get().runtime.output_dir)["test_loss"]
