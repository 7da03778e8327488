"""The main job: train and record, leave-one-out ground truth, influence, evaluation.

:func:`run_experiment` runs the stages in order. Training, ground truth and each influence
method are cached stages (see :mod:`attrbench.stages`): a rerun with the same configuration reuses
them, and ground truth saves its progress after every chunk of counterfactual runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from attrbench.evaluation.metrics import rowwise_correlations, summarize
from attrbench.evaluation.plots import plot_scatter, plot_spearman_bars
from attrbench.evaluation.report import format_markdown, write_table
from attrbench.experiment import Experiment, build_experiment
from attrbench.groundtruth.loo import leave_one_out
from attrbench.influence import InfluenceScores, build_method, compute_influence
from attrbench.io import load_tensors, save_tensors, write_json, write_text
from attrbench.stages import Stage, config_key, open_stage
from attrbench.tasks import select
from attrbench.training.trainer import train
from attrbench.training.trajectory import DTYPES, CorruptTrajectoryError, Trajectory

log = logging.getLogger(__name__)


def run_experiment(cfg: DictConfig, run_dir: str | Path) -> pd.DataFrame:
    """Run every stage for ``cfg``, write the results into ``run_dir`` and return the table."""
    run_dir = Path(run_dir)
    started = time.perf_counter()
    experiment = build_experiment(cfg)
    scored = num_scored(experiment)
    log.info("run: %s, %d steps, %d parameters, device %s", experiment.description,
             experiment.batches.num_steps, experiment.task.num_parameters, experiment.device)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    timings: dict[str, float] = {}
    trajectory, train_stage = _timed(timings, "train", train_stage_for, experiment)
    delta, groundtruth_stage = _timed(timings, "groundtruth", groundtruth_for, experiment, trajectory, train_stage)
    predictions, influence_stages = {}, {}
    for method in cfg.influence.methods:
        scores, stage = _timed(timings, method, influence_for, experiment, trajectory, train_stage, method)
        predictions[method] = scores.predicted_delta(cfg.groundtruth.removal)[:, experiment.samples].numpy()
        influence_stages[method] = stage

    table = evaluate(experiment, delta[:scored].numpy(), predictions, run_dir)
    timings["total"] = time.perf_counter() - started
    _write_run_summary(run_dir, experiment, table, timings,
                       {"train": train_stage, "groundtruth": groundtruth_stage, **influence_stages})
    print(f"\n{experiment.description}\n{format_markdown(table)}")
    return table


def _timed(timings: dict, name: str, function, *args):
    start = time.perf_counter()
    result = function(*args)
    timings[name] = time.perf_counter() - start
    log.info("stage %s: %.1f s", name, timings[name])
    return result


def train_stage_config(cfg: DictConfig) -> dict:
    keys = ("data", "model", "optimizer", "schedule", "train", "seed", "dtype", "trajectory")
    config = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
              for key in keys}
    config["task"] = cfg.setting.task
    return config


def train_stage_for(experiment: Experiment) -> tuple[Trajectory, Stage]:
    """Load the recorded trajectory for this config, or train and record it."""
    cfg = experiment.config
    stage = open_stage(cfg.cache_dir, "train", train_stage_config(cfg))
    directory = stage.directory / "trajectory"
    if stage.is_complete():
        try:
            log.info("train: reusing the recorded trajectory in %s", directory)
            return Trajectory.load(directory), stage
        except CorruptTrajectoryError as error:
            log.warning("train: %s; training again", error)

    start = time.perf_counter()
    trajectory = train(
        experiment.task, experiment.data.train, experiment.batches, experiment.lrs, experiment.optimizer,
        checkpoint_every=cfg.trajectory.checkpoint_every, progress=cfg.progress,
    )
    storage = DTYPES[cfg.trajectory.storage_dtype] if cfg.trajectory.storage_dtype else None
    trajectory.save(directory, storage_dtype=storage)
    final_losses = experiment.task.evaluate_losses(trajectory.final_parameters(experiment.device),
                                                   experiment.data.test)
    stage.complete({}, time.perf_counter() - start,
                   {"num_steps": trajectory.num_steps, "final_test_loss": float(final_losses.mean())})
    return Trajectory.load(directory), stage


def groundtruth_for(experiment: Experiment, trajectory: Trajectory, train_stage: Stage) -> tuple[torch.Tensor, Stage]:
    """Leave-one-out deltas ``[num_test, num_samples]``, resuming from saved chunks."""
    cfg = experiment.config
    config = {
        "train": train_stage.key,
        "num_samples": cfg.groundtruth.num_samples,
        "removal": cfg.groundtruth.removal,
        "samples": config_key({"samples": experiment.samples.tolist()}),
    }
    stage = open_stage(cfg.cache_dir, "groundtruth", config)
    result_path, partial_path = stage.directory / "delta.safetensors", stage.directory / "partial.safetensors"
    if stage.is_complete():
        log.info("groundtruth: reusing %s", result_path)
        return load_tensors(result_path)["delta"], stage

    samples = experiment.samples
    delta = torch.zeros(experiment.data.num_test, len(samples), dtype=trajectory.dtype)
    done = torch.zeros(len(samples), dtype=torch.bool)
    if partial_path.exists():
        partial = load_tensors(partial_path)
        if torch.equal(partial["samples"], samples):
            delta, done = partial["delta"], partial["done"].bool()
            log.info("groundtruth: resuming, %d of %d samples already done", int(done.sum()), len(samples))

    todo = (~done).nonzero().flatten()

    def save_chunk(positions: torch.Tensor, chunk_delta: torch.Tensor) -> None:
        delta[:, todo[positions]] = chunk_delta
        done[todo[positions]] = True
        save_tensors(partial_path, {"delta": delta, "done": done.to(torch.uint8), "samples": samples})

    start = time.perf_counter()
    if len(todo):
        leave_one_out(
            experiment.task, experiment.data.train, experiment.data.test, trajectory, samples[todo],
            cfg.groundtruth.removal, cfg.groundtruth.chunk_size, cfg.progress, save_chunk, experiment.device,
        )
    digest = save_tensors(result_path, {"delta": delta, "samples": samples})
    stage.complete({"delta.safetensors": digest}, time.perf_counter() - start)
    partial_path.unlink(missing_ok=True)
    return delta, stage


def num_scored(experiment: Experiment) -> int:
    """How many test functions, from the first, enter the Spearman table.

    ``evaluation.num_scored`` caps the count; with fewer test functions (a smaller data variant,
    say) all of them are scored.
    """
    requested, available = experiment.config.evaluation.get("num_scored"), experiment.data.num_test
    if requested is None:
        return available
    if requested < 1:
        raise ValueError(f"evaluation.num_scored={requested} must be at least 1, or null to score every test function")
    return min(requested, available)


def influence_for(experiment: Experiment, trajectory: Trajectory, train_stage: Stage, name: str):
    """Influence scores of one method for every scored test function and training sample."""
    cfg = experiment.config
    scored = num_scored(experiment)
    config = {"train": train_stage.key, "method": name}
    if scored < experiment.data.num_test:
        config["num_scored"] = scored
    stage = open_stage(cfg.cache_dir, f"influence/{name}", config)
    path = stage.directory / "scores.safetensors"
    if stage.is_complete():
        log.info("%s: reusing %s", name, path)
        tensors = load_tensors(path)
        return InfluenceScores(tensors["derivative"], tensors["renormalize_correction"]), stage

    start = time.perf_counter()
    scores = compute_influence(
        build_method(name), experiment.task, experiment.data.train, select(experiment.data.test, slice(0, scored)),
        trajectory,
        query_chunk_size=cfg.influence.query_chunk_size, device=experiment.device, progress=cfg.progress,
    )
    digest = save_tensors(path, {"derivative": scores.derivative,
                                 "renormalize_correction": scores.renormalize_correction})
    stage.complete({"scores.safetensors": digest}, time.perf_counter() - start)
    return scores, stage


def evaluate(experiment: Experiment, delta: np.ndarray, predictions: dict[str, np.ndarray], run_dir: Path) -> pd.DataFrame:
    """Per-test-point correlations, the summary table and the plots, written to ``run_dir``."""
    per_test = pd.concat(
        [rowwise_correlations(predicted, delta).assign(method=method, test_point=np.arange(len(delta)))
         for method, predicted in predictions.items()],
        ignore_index=True,
    )
    table = summarize(per_test)
    write_table(per_test[["method", "test_point", "spearman", "pearson", "kendall"]], run_dir, "correlations")
    write_table(table, run_dir, "spearman")
    save_tensors(run_dir / "groundtruth.safetensors",
                 {"delta": torch.from_numpy(delta), "samples": experiment.samples})
    save_tensors(run_dir / "predictions.safetensors",
                 {method: torch.from_numpy(values) for method, values in predictions.items()})

    count = min(experiment.config.evaluation.scatter_test_points, len(delta))
    plot_scatter(delta, predictions, list(range(count)), run_dir / "scatter.png", experiment.description)
    plot_spearman_bars(table, run_dir / "spearman.png", experiment.description)
    return table


def _write_run_summary(run_dir: Path, experiment: Experiment, table: pd.DataFrame, timings: dict, stages: dict) -> None:
    cfg = experiment.config
    write_json(
        run_dir / "summary.json",
        {
            "setting": cfg.setting.name,
            "variant": experiment.variant,
            "data_source": experiment.data.source,
            "optimizer": experiment.optimizer.name,
            "lr": cfg.optimizer.lr,
            "seed": cfg.seed,
            "dtype": cfg.dtype,
            "removal": cfg.groundtruth.removal,
            "num_train": experiment.data.num_train,
            "num_test": experiment.data.num_test,
            "num_scored": num_scored(experiment),
            "num_samples": len(experiment.samples),
            "num_steps": experiment.batches.num_steps,
            "num_parameters": experiment.task.num_parameters,
            "device": str(experiment.device),
            "timings_seconds": {name: round(value, 3) for name, value in timings.items()},
            "stages": {name: {"key": stage.key, "directory": str(stage.directory)} for name, stage in stages.items()},
            "table": table.to_dict(orient="records"),
        },
    )
