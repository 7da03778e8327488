"""One selection run from its Hydra config: build, select, train, evaluate, write the results.

``selection.method`` picks what is trained:

* ``none``: the reference run on every training sample (the no-selection baseline);
* ``random``: online, drops a random ``fraction`` of every batch;
* ``lookahead``: online, drops the ``fraction`` of every batch with the lowest look-ahead score
  of horizon ``selection.horizon`` (K);
* ``offline``: scores every sample on the reference run by its effect on the final validation
  loss, drops the lowest ``fraction`` of the training set, and retrains.

The reference run is a cached stage (``cache_dir/selection/reference/<key>``), so the ``none`` and
``offline`` runs of one configuration train it once. Every run writes ``config.yaml``,
``selection.json`` (settings, final test and validation metrics, timings) and
``selection.safetensors`` (what was dropped, and the scores) into its run directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.func import functional_call

from attrbench.experiment import (
    ConfigError, build_training_schedule, config_checks, derive_seed, load_data_and_task, validate_config,
)
from attrbench.io import save_tensors, sha256, write_json, write_text
from attrbench.pipeline import train_stage_config
from attrbench.selection.data import SelectionData, split_validation
from attrbench.selection.offline import train_offline
from attrbench.selection.online import SelectionRun, check_fraction, drop_count, train_online
from attrbench.stages import check_cache_dir, open_stage
from attrbench.tasks import Batch, Task, num_samples, select
from attrbench.training.optim import OptimizerSpec
from attrbench.training.schedule import BatchSchedule
from attrbench.training.trainer import train
from attrbench.training.trajectory import CorruptTrajectoryError, Trajectory

log = logging.getLogger(__name__)

SELECTION_METHODS = ("none", "random", "lookahead", "offline")


@dataclass
class SelectionSetup:
    """Everything a selection run computes on, built once from the config."""

    config: DictConfig
    device: torch.device
    data: SelectionData
    task: Task
    batches: BatchSchedule
    lrs: list[float]
    optimizer: OptimizerSpec

    @property
    def description(self) -> str:
        c, selection = self.config, self.config.selection
        method = f"lookahead K={selection.horizon}" if selection.method == "lookahead" else selection.method
        return (
            f"{c.setting.name} | {method} | drop {selection.fraction:g} | lr {c.optimizer.lr:g} | "
            f"seed {c.seed} | {c.dtype}"
        )


def validate_selection(cfg: DictConfig) -> None:
    """Reject unknown or out-of-range ``selection`` settings before any work starts.

    Raises:
        ConfigError: For the first invalid value found.
    """
    try:
        _check_selection(cfg.selection, cfg.train.batch_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_selection(selection: DictConfig, batch_size: int) -> None:
    if selection.method not in SELECTION_METHODS:
        raise ValueError(
            f"selection.method={selection.method!r} is not one of {', '.join(SELECTION_METHODS)}"
        )
    if not isinstance(selection.horizon, int) or selection.horizon < 0:
        raise ValueError(f"selection.horizon={selection.horizon!r} must be an integer of at least 0")
    check_fraction(selection.fraction)
    # Random and look-ahead selection drop samples per batch, and always keep one sample of each.
    per_batch = selection.method in ("random", "lookahead")
    if per_batch and selection.fraction > 0 and drop_count(batch_size, selection.fraction) == 0:
        raise ValueError(
            f"selection.fraction={selection.fraction:g} drops no sample from batches of "
            f"train.batch_size={batch_size}: the count {selection.fraction:g} x {batch_size} is rounded to a "
            "whole number and every batch keeps one sample. Raise selection.fraction or train.batch_size"
        )


def build_selection(cfg: DictConfig) -> SelectionSetup:
    """Data splits, task, batch schedule and optimizer of a selection run.

    Data and initialization come from the same derived seeds as in ``attrbench run``, so the
    model starts from the same weights. The validation split is then taken out of the training
    split, and the batch schedule shuffles what remains. Leave-one-out samples are not drawn,
    so ``groundtruth`` settings do not constrain a selection run.
    """
    # NOTE: selection runs were tested on the CPU only. The device=cuda path moves tensors the way
    # training does but has not been run.
    validate_config(cfg)
    validate_selection(cfg)
    with config_checks():
        check_cache_dir(cfg.cache_dir)
    device, _, loaded, task = load_data_and_task(cfg)
    with config_checks():  # selection.num_validation against the loaded training set
        data = split_validation(loaded, cfg.selection.num_validation, derive_seed(cfg.seed, "validation"))
    batches, lrs, optimizer = build_training_schedule(cfg, data.num_train)
    return SelectionSetup(cfg, device, data, task, batches, lrs, optimizer)


def run_selection(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the configured selection method, write its results into ``run_dir`` and return the summary."""
    run_dir = Path(run_dir)
    started = time.perf_counter()
    setup = build_selection(cfg)
    data, batches = setup.data, setup.batches
    log.info(
        "select: %s, %d steps, %d train / %d validation / %d test samples",
        setup.description,
        batches.num_steps,
        data.num_train,
        num_samples(data.validation),
        num_samples(data.test),
    )
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    selection_started = time.perf_counter()
    run = _select_and_train(setup)
    selection_seconds = time.perf_counter() - selection_started

    method = cfg.selection.method
    summary = {
        "setting": cfg.setting.name,
        "method": method,
        "horizon": cfg.selection.horizon if method == "lookahead" else None,
        "fraction": cfg.selection.fraction,
        "lr": cfg.optimizer.lr,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "num_steps": batches.num_steps,
        "num_train": data.num_train,
        "num_validation": num_samples(data.validation),
        "num_test": num_samples(data.test),
        "num_dropped": run.num_dropped,
        "data_source": data.source,
        "device": str(setup.device),
        **evaluate_run(setup.task, run.theta, data, cfg.setting.task),
        "selection_seconds": round(selection_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
    }
    # selection.json goes last: the report reads a run only once it is complete.
    save_tensors(run_dir / "selection.safetensors", _run_tensors(run, data))
    write_json(run_dir / "selection.json", summary)
    accuracy = summary["test_accuracy"]
    print(
        f"select {setup.description}: test loss {summary['test_loss']:.4f}"
        + (f", test accuracy {accuracy:.4f}" if accuracy is not None else "")
        + f", {run.num_dropped} samples dropped"
    )
    return summary


def _select_and_train(setup: SelectionSetup) -> SelectionRun:
    cfg, data, task = setup.config, setup.data, setup.task
    selection = cfg.selection
    if selection.method in ("none", "offline"):
        reference = reference_run(setup)
        if selection.method == "none":
            return SelectionRun(
                theta=reference.final_parameters(setup.device),
                batches=setup.batches,
                kept=setup.batches,
                lrs=list(setup.lrs),
                dropped=torch.zeros(setup.batches.indices.shape, dtype=torch.bool),
            )
        return train_offline(
            task, data.train, data.validation, reference, selection.fraction, setup.device, cfg.progress
        )
    return train_online(
        task,
        data.train,
        data.validation,
        setup.batches,
        setup.lrs,
        setup.optimizer,
        selection.method,
        selection.fraction,
        selection.horizon,
        derive_seed(cfg.seed, "selection-random"),
        cfg.progress,
    )


def reference_run(setup: SelectionSetup) -> Trajectory:
    """Load the cached reference run on the full training split, or train and record it."""
    cfg = setup.config
    data = setup.data
    config = {**train_stage_config(cfg, data.train, data.validation, data.test),
              "num_validation": cfg.selection.num_validation}
    stage = open_stage(cfg.cache_dir, "selection/reference", config)
    directory = stage.directory / "trajectory"
    # The lock keeps concurrent jobs of a sweep (none and offline) from training it twice.
    with stage.lock():
        if stage.is_complete():
            try:
                log.info("select: reusing the reference run in %s", directory)
                return Trajectory.load(directory)
            except CorruptTrajectoryError as error:
                log.warning("select: %s; training the reference run again", error)
        stage.begin()
        trajectory = train(
            setup.task,
            setup.data.train,
            setup.batches,
            setup.lrs,
            setup.optimizer,
            checkpoint_every=cfg.trajectory.checkpoint_every,
            progress=cfg.progress,
        )
        trajectory.save(directory)
        stage.complete(
            {"trajectory/manifest.json": sha256(directory / "manifest.json")},
            {"num_steps": trajectory.num_steps},
        )
    return Trajectory.load(directory)


def evaluate_run(task: Task, theta: torch.Tensor, data: SelectionData, task_name: str) -> dict:
    """Final mean test and validation loss, and test accuracy for classification tasks (else None)."""
    return {
        "test_loss": float(task.evaluate_losses(theta, data.test).mean()),
        "test_accuracy": classification_accuracy(task, theta, data.test)
        if task_name == "classification"
        else None,
        "validation_loss": float(task.evaluate_losses(theta, data.validation).mean()),
    }


def classification_accuracy(task: Task, theta: torch.Tensor, data: Batch, chunk_size: int = 1024) -> float:
    """Share of ``data["y"]`` that the model's largest logit matches."""
    params = {**task.layout.unflatten(theta.detach()), **task.buffers}
    size, correct = num_samples(data), 0
    with torch.no_grad():
        for start in range(0, size, chunk_size):
            chunk = select(data, slice(start, start + chunk_size))
            logits = functional_call(task.model, params, (chunk["x"],))
            correct += int((logits.argmax(dim=-1) == chunk["y"]).sum())
    return correct / size


def _run_tensors(run: SelectionRun, data: SelectionData) -> dict[str, torch.Tensor]:
    tensors = {
        "batch_indices": run.batches.indices,
        "dropped": run.dropped.to(torch.uint8),
        "kept_indices": run.kept.indices.clone(),
        "kept_sizes": run.kept.sizes.clone(),
        "validation_index": data.validation_index,
    }
    if run.step_scores is not None:
        tensors["step_scores"] = run.step_scores
    if run.sample_scores is not None:
        tensors["sample_scores"] = run.sample_scores
    return tensors
