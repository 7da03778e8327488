"""The main job: train and record, leave-one-out ground truth, influence, evaluation.

:func:`run_experiment` runs the stages in order. Each is a cached stage (see
:mod:`attrbench.stages`) under ``cache_dir``: a rerun with the same configuration reuses it, and
concurrent jobs share it through a file lock, so the shards of one run train the reference
trajectory once. Ground truth is split into ``groundtruth.num_shards`` shards (see
:mod:`attrbench.groundtruth.shards`). A job with ``groundtruth.shard=k`` computes only shard k and
evaluates only if every other shard is already finished; ``groundtruth.shard=null`` computes every
unfinished shard, then evaluates. Each shard saves its progress after every chunk of
counterfactual runs (see :mod:`attrbench.groundtruth.resume`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from attrbench.analysis import run_analysis
from attrbench.evaluation.metrics import rowwise_correlations, summarize
from attrbench.evaluation.plots import plot_scatter, plot_spearman_bars
from attrbench.evaluation.report import format_markdown, write_table
from attrbench.experiment import Experiment, build_experiment, config_checks, validate_config
from attrbench.groundtruth.resume import SHARD_FILE, ShardWork, compute_shard
from attrbench.groundtruth.shards import (
    MergedGroundTruth, MissingShardsError, Shard, ShardIdentity, check_sharding, merge_shards, plan_chunks,
    samples_key, shard_chunk_ids, shard_file_name,
)
from attrbench.influence import METHODS, InfluenceScores, build_method, compute_influence, load_scores
from attrbench.io import load_tensors, save_tensors, sha256, write_json, write_text
from attrbench.memory import check_memory
from attrbench.stages import (
    Stage, check_cache_dir, config_key, copy_file, open_stage, suggest_on_out_of_memory, timestamp,
)
from attrbench.tasks import Batch, fingerprint, select
from attrbench.training.optim import OptimizerSpec
from attrbench.training.trainer import train
from attrbench.training.trajectory import DTYPES, CorruptTrajectoryError, Trajectory

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
EVALUATION_FILES = ["groundtruth.safetensors", "predictions.safetensors", "correlations.csv", "correlations.md",
                    "spearman.csv", "spearman.md", "scatter.png", "spearman.png"]


def run_experiment(cfg: DictConfig, run_dir: str | Path) -> pd.DataFrame | None:
    """Run every stage for ``cfg``, write the results into ``run_dir`` and return the table.

    Returns None, after writing ``summary.json``, when this job computed one ground-truth shard
    and other shards are not finished yet.
    """
    run_dir = Path(run_dir)
    # A summary.json left by an earlier attempt in a reused run directory would make this attempt
    # read as finished if it is interrupted or killed, which writes no failed.json. Only the
    # report reads the file, the results stay in cache_dir, and a successful attempt rewrites it.
    (run_dir / SUMMARY_FILE).unlink(missing_ok=True)
    started = time.perf_counter()
    gt = cfg.groundtruth
    validate_config(cfg)  # before the sharding check, whose messages assume valid sizes
    with config_checks():
        check_cache_dir(cfg.cache_dir)
        check_sharding(gt.num_samples, gt.chunk_size, gt.num_shards, gt.shard)
        optimizer = OptimizerSpec.from_config(OmegaConf.to_container(cfg.optimizer, resolve=True))
        for method in cfg.influence.methods:  # before training, not when the method's stage starts
            build_method(method).check_optimizer(optimizer)
    experiment = build_experiment(cfg)
    with config_checks():
        num_scored(experiment)  # rejects an invalid evaluation.num_scored before any work
    log.info("run: %s, %d steps, %d parameters, device %s", experiment.description,
             experiment.batches.num_steps, experiment.task.num_parameters, experiment.device)
    with config_checks():  # an invalid memory.budget_gb; a plan over budget raises MemoryBudgetError
        check_memory(experiment)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    timings: dict[str, float] = {}
    stages: dict[str, Stage] = {}
    trajectory = _timed(timings, "train", train_stage_for, experiment, stages)
    groundtruth, missing = _timed(timings, "groundtruth", groundtruth_for, experiment, trajectory, stages, run_dir)
    if groundtruth is None:
        timings["total"] = time.perf_counter() - started
        _write_run_summary(run_dir, experiment, None, timings, stages, missing)
        return None

    influence = {}
    for method in cfg.influence.methods:
        influence[method] = _timed(timings, method, influence_for, experiment, trajectory, stages, method)
    table = _timed(timings, "evaluation", evaluation_for, experiment, groundtruth, influence, stages, run_dir)
    if cfg.get("analysis") is not None:
        _timed(timings, "analysis", run_analysis, experiment, trajectory, stages, groundtruth, run_dir)
    timings["total"] = time.perf_counter() - started
    _write_run_summary(run_dir, experiment, table, timings, stages, [])
    print(f"\n{experiment.description}\n{format_markdown(table)}")
    return table


def _timed(timings: dict, name: str, function, *args):
    start = time.perf_counter()
    result = function(*args)
    timings[name] = time.perf_counter() - start
    log.info("stage %s: %.1f s", name, timings[name])
    return result


def train_stage_config(cfg: DictConfig, *datasets: Batch) -> dict:
    """Build the configuration that determines a recorded trajectory.

    The SHA-256 of ``datasets`` joins the config, so a data source that changes under the same
    config (another CPython's bundled documentation, MNIST files appearing under ``data.root``)
    trains again instead of reusing a stale trajectory.
    """
    keys = ("data", "model", "optimizer", "schedule", "train", "seed", "dtype", "trajectory")
    config = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
              for key in keys}
    config["task"] = cfg.setting.task
    if datasets:
        config["data_sha256"] = fingerprint(*datasets)
    return config


def trajectory_sha256(trajectory: Trajectory) -> str:
    """Checksum of the saved trajectory's manifest, which lists the SHA-256 of every checkpoint."""
    return sha256(trajectory.directory / "manifest.json")


def train_stage_for(experiment: Experiment, stages: dict[str, Stage]) -> Trajectory:
    """Load the recorded trajectory for this config, or train and record it (one job at a time)."""
    cfg = experiment.config
    stage = stages["train"] = open_stage(
        cfg.cache_dir, "train", train_stage_config(cfg, experiment.data.train, experiment.data.test)
    )
    directory = stage.directory / "trajectory"
    with stage.lock():
        if stage.is_complete():
            try:
                log.info("train: reusing the recorded trajectory in %s", directory)
                trajectory = Trajectory.load(directory)
                stage.status = "reused"
                return trajectory
            except CorruptTrajectoryError as error:
                log.warning("train: %s; training again", error)

        stage.begin()
        micro_batch_size = cfg.train.micro_batch_size or cfg.train.batch_size
        advice = ("Lower train.micro_batch_size to split every batch into smaller pieces "
                  f"(now {cfg.train.micro_batch_size}), for example train.micro_batch_size={max(1, micro_batch_size // 2)}.")
        storage = DTYPES[cfg.trajectory.storage_dtype] if cfg.trajectory.storage_dtype else None
        with suggest_on_out_of_memory("training", advice):
            trajectory = train(
                experiment.task, experiment.data.train, experiment.batches, experiment.lrs, experiment.optimizer,
                checkpoint_every=cfg.trajectory.checkpoint_every, progress=cfg.progress,
                directory=directory, storage_dtype=storage,
            )
            final_losses = experiment.task.evaluate_losses(trajectory.final_parameters(experiment.device),
                                                           experiment.data.test)
        stage.complete({"trajectory/manifest.json": sha256(directory / "manifest.json")},
                       {"num_steps": trajectory.num_steps, "final_test_loss": float(final_losses.mean())})
        stage.status = "computed"
        return Trajectory.load(directory)


def groundtruth_config(experiment: Experiment, trajectory: Trajectory, train_key: str) -> dict:
    """Build the stage configuration shared by every ground-truth shard of this run (each adds its index)."""
    gt = experiment.config.groundtruth
    return {
        "train": train_key,
        "trajectory": trajectory_sha256(trajectory),
        "removal": gt.removal,
        "samples": samples_key(experiment.samples),
        "chunk_size": gt.chunk_size,
        "num_shards": gt.num_shards,
    }


def groundtruth_for(experiment: Experiment, trajectory: Trajectory, stages: dict[str, Stage],
                    run_dir: Path) -> tuple[MergedGroundTruth | None, list[int]]:
    """Compute this job's ground-truth shards and merge all shards if every one is finished.

    Returns:
        The merged deltas (None if some shards are unfinished) and the unfinished shard indices.
    """
    cfg = experiment.config
    gt = cfg.groundtruth
    config = groundtruth_config(experiment, trajectory, stages["train"].key)
    identity = ShardIdentity(gt.num_shards, config_key(config), config["trajectory"], config["samples"],
                             len(experiment.samples), experiment.data.num_test, gt.removal)
    chunks = plan_chunks(trajectory.batches.first_steps(experiment.samples), gt.chunk_size)
    shard_stages = {index: open_stage(cfg.cache_dir, "groundtruth", {**config, "shard": index})
                    for index in range(gt.num_shards)}
    for index, stage in shard_stages.items():
        stages[f"groundtruth/{index}" if gt.num_shards > 1 else "groundtruth"] = stage

    mine = list(range(gt.num_shards)) if gt.shard is None else [gt.shard]

    def work_for(index: int) -> ShardWork:
        return ShardWork(index, identity, experiment.samples, chunks, shard_chunk_ids(len(chunks), gt.num_shards, index))

    shards = _compute_shards(experiment, trajectory, {index: shard_stages[index] for index in mine}, work_for)
    if gt.shard is not None and gt.num_shards > 1:
        copy_file(shard_stages[gt.shard].directory / SHARD_FILE, run_dir / shard_file_name(gt.shard, gt.num_shards))

    for index, stage in shard_stages.items():
        if index in shards:
            continue
        if stage.is_complete():
            stage.status = "reused"
            shards[index] = Shard.load(stage.directory / SHARD_FILE)
        else:
            stage.status = "missing"
    missing = [index for index in range(gt.num_shards) if index not in shards]
    if missing:
        log.info(
            "groundtruth: shard %d of %d is done; unfinished shards in %s: %s, so this job does not "
            "evaluate. The job that finishes the last shard evaluates; or rerun with groundtruth.shard=null "
            "(computes only the missing shards, then evaluates), or merge shard files with `attrbench merge DIR`",
            gt.shard, gt.num_shards, cfg.cache_dir, ", ".join(map(str, missing)),
        )
        return None, missing
    try:
        return merge_shards(list(shards.values()), where=f"{cfg.cache_dir}/groundtruth"), []
    except MissingShardsError as error:  # a shard stage was reused but reports other indices
        raise RuntimeError(f"groundtruth: the cached shards do not assemble: {error}") from error


def _compute_shards(experiment: Experiment, trajectory: Trajectory, shard_stages: dict[int, Stage],
                    work_for) -> dict[int, Shard]:
    """Reuse or compute each shard under its lock; shards another job holds are done last."""
    shards: dict[int, Shard] = {}
    deferred = []
    for index, stage in shard_stages.items():
        with stage.lock(blocking=len(shard_stages) == 1) as acquired:
            if acquired:
                shards[index] = _reuse_or_compute_shard(experiment, trajectory, stage, work_for(index))
            else:
                log.info("groundtruth: another job is computing shard %d; doing the other shards first", index)
                deferred.append(index)
    for index in deferred:
        with shard_stages[index].lock():
            shards[index] = _reuse_or_compute_shard(experiment, trajectory, shard_stages[index], work_for(index))
    return shards


def _reuse_or_compute_shard(experiment: Experiment, trajectory: Trajectory, stage: Stage, work: ShardWork) -> Shard:
    cfg = experiment.config
    if stage.is_complete():
        log.info("groundtruth: reusing shard %d of %d in %s", work.shard, work.identity.num_shards, stage.directory)
        stage.status = "reused"
        return Shard.load(stage.directory / SHARD_FILE)
    stage.status = "computed"
    advice = (f"Lower groundtruth.chunk_size (now {cfg.groundtruth.chunk_size} counterfactual runs trained "
              f"together; memory grows linearly with it), for example groundtruth.chunk_size="
              f"{max(1, cfg.groundtruth.chunk_size // 2)}. Every shard of a run must use the same value, and "
              "changing it restarts the ground truth.")
    with suggest_on_out_of_memory(f"groundtruth shard {work.shard}", advice):
        return compute_shard(stage, work, experiment.task, experiment.data.train, experiment.data.test, trajectory,
                             experiment.device, cfg.progress)


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


def influence_for(experiment: Experiment, trajectory: Trajectory, stages: dict[str, Stage], name: str):
    """Influence scores of one method for every scored test function and training sample.

    A method that scores only the attributed samples gets them and the removal semantics, and
    both enter its stage key.
    """
    cfg = experiment.config
    scored = num_scored(experiment)
    method = build_method(name, **method_options(cfg, name))
    config = {"train": stages["train"].key, "trajectory": trajectory_sha256(trajectory), "method": name}
    if scored < experiment.data.num_test:
        config["num_scored"] = scored
    if method.needs_samples:
        config["samples"] = samples_key(experiment.samples)
        config["removal"] = cfg.groundtruth.removal
    stage = stages[name] = open_stage(cfg.cache_dir, f"influence/{name}", config)
    path = stage.directory / "scores.safetensors"
    with stage.lock():
        if stage.is_complete():
            log.info("%s: reusing %s", name, path)
            stage.status = "reused"
            return load_scores(load_tensors(path))

        stage.begin()
        advice = (f"Lower influence.query_chunk_size (now {cfg.influence.query_chunk_size} test points per "
                  f"reverse sweep), for example influence.query_chunk_size={max(1, cfg.influence.query_chunk_size // 2)}.")
        if method.needs_samples:
            size = method.sample_chunk_size
            advice = (f"Lower influence.sample_chunk_size (now {size} samples whose tangents are propagated "
                      f"together), for example influence.sample_chunk_size={max(1, size // 2)}.")
        with suggest_on_out_of_memory(name, advice):
            scores = compute_influence(
                method, experiment.task, experiment.data.train,
                select(experiment.data.test, slice(0, scored)), trajectory,
                query_chunk_size=cfg.influence.query_chunk_size, device=experiment.device, progress=cfg.progress,
                samples=experiment.samples, removal=cfg.groundtruth.removal,
            )
        digest = save_tensors(path, scores.to_tensors())
        stage.complete({"scores.safetensors": digest})
        stage.status = "computed"
        return scores


def method_options(cfg: DictConfig, name: str) -> dict:
    """Constructor options of influence method ``name`` from the config."""
    if name in METHODS and METHODS[name].needs_samples:
        return {"sample_chunk_size": cfg.influence.get("sample_chunk_size", 64)}
    return {}


def evaluation_for(experiment: Experiment, groundtruth: MergedGroundTruth, influence: dict[str, InfluenceScores],
                   stages: dict[str, Stage], run_dir: Path) -> pd.DataFrame:
    """Correlations, tables and plots, cached under the checksums of their inputs and copied into ``run_dir``."""
    cfg = experiment.config
    config = {
        "groundtruth": [stage.record()["files"] for name, stage in sorted(stages.items())
                        if name.startswith("groundtruth")],
        "influence": {method: stages[method].record()["files"] for method in influence},
        "removal": cfg.groundtruth.removal,
        "evaluation": OmegaConf.to_container(cfg.evaluation, resolve=True),
        "description": experiment.description,
    }
    stage = stages["evaluation"] = open_stage(cfg.cache_dir, "evaluation", config)
    with stage.lock():
        if stage.is_complete():
            log.info("evaluation: reusing %s", stage.directory)
            stage.status = "reused"
            table = pd.read_csv(stage.directory / "spearman.csv")
        else:
            stage.begin()
            removal = cfg.groundtruth.removal
            predictions = {method: scores.predicted_delta(removal)[:, groundtruth.samples].numpy()
                           for method, scores in influence.items()}
            table = evaluate(experiment, groundtruth, predictions, stage.directory)
            stage.complete({name: sha256(stage.directory / name) for name in EVALUATION_FILES})
            stage.status = "computed"
    stage.copy_outputs(EVALUATION_FILES, run_dir)
    return table


def _warn_non_finite(name: str, values: np.ndarray) -> None:
    """Log a warning when ``values`` has NaN or infinite entries: their test points get no correlation."""
    bad = int((~np.isfinite(values)).sum())
    if bad:
        log.warning(
            "%s has %d non-finite values of %d; the test points that contain them count as undefined "
            "in the table. The run probably diverged: lower optimizer.lr or use dtype=float64",
            name, bad, values.size,
        )


def evaluate(experiment: Experiment, groundtruth: MergedGroundTruth, predictions: dict[str, np.ndarray],
             out_dir: Path) -> pd.DataFrame:
    """Per-test-point correlations, the summary table and the plots, written to ``out_dir``.

    Only the first ``evaluation.num_scored`` test functions enter the correlations.
    """
    delta = groundtruth.delta[: num_scored(experiment)].numpy()
    _warn_non_finite("the leave-one-out ground truth", delta)
    for method, predicted in predictions.items():
        _warn_non_finite(method, predicted[: len(delta)])
    per_test = pd.concat(
        [rowwise_correlations(predicted, delta).assign(method=method, test_point=np.arange(len(delta)))
         for method, predicted in predictions.items()],
        ignore_index=True,
    )
    table = summarize(per_test)
    write_table(per_test[["method", "test_point", "spearman", "pearson", "kendall"]], out_dir, "correlations")
    write_table(table, out_dir, "spearman")
    groundtruth.save(out_dir / "groundtruth.safetensors")
    save_tensors(out_dir / "predictions.safetensors",
                 {method: torch.from_numpy(values) for method, values in predictions.items()})

    count = min(experiment.config.evaluation.scatter_test_points, len(delta))
    plot_scatter(delta, predictions, list(range(count)), out_dir / "scatter.png", experiment.description)
    plot_spearman_bars(table, out_dir / "spearman.png", experiment.description)
    return table


def _write_run_summary(run_dir: Path, experiment: Experiment, table: pd.DataFrame | None, timings: dict,
                       stages: dict[str, Stage], missing_shards: list[int]) -> None:
    cfg = experiment.config
    write_json(
        run_dir / SUMMARY_FILE,
        {
            "setting": cfg.setting.name,
            "variant": experiment.variant,
            "status": "complete" if table is not None else "waiting_for_shards",
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
            "num_shards": cfg.groundtruth.num_shards,
            "shard": cfg.groundtruth.shard,
            "missing_shards": missing_shards,
            "device": str(experiment.device),
            "finished_at": timestamp(),
            "timings_seconds": {name: round(value, 3) for name, value in timings.items()},
            "stages": {name: {"key": stage.key, "directory": str(stage.directory), "status": stage.status}
                       for name, stage in stages.items()},
            "table": table.to_dict(orient="records") if table is not None else [],
        },
    )
