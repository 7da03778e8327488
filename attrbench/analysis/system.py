"""System-level error: how precision, trajectory storage, checkpoint spacing and reruns move results.

``attrbench run +analysis=system`` runs the setting of the config (which must be float64) and then
measures, against that float64 reference:

* precision: float32 for everything (its own training run, ground truth and AdamW-influence);
  float32 ground truth only (counterfactuals retrained in float32 from the float64 run's
  checkpoints); float32 influence only (the float64 trajectory read in float32);
* storage: the trajectory's checkpoints stored in float32, bfloat16 or float16 and read back;
* checkpoints: a checkpoint every k steps, with exact recomputation of the steps in between
  (replay) or approximate reuse, where each step starts from the stored state nearest to it;
* noise floor: the ground truth recomputed by an identical rerun, which must agree bit for
  bit in deterministic mode on CPU. It is also recomputed with a different number of
  counterfactuals per stack, which changes only the rounding of the batched kernels, and the
  training run is repeated.

Each row reports AdamW-influence's mean Spearman against its own ground truth and against the
float64 reference, the largest change of the scores, and the change of the ground truth
itself, also relative to the size of the leave-one-out effects.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from attrbench.evaluation.metrics import rowwise_correlations
from attrbench.evaluation.report import format_markdown
from attrbench.groundtruth.loo import leave_one_out
from attrbench.influence import compute_influence
from attrbench.influence.adamw import AdamWInfluence
from attrbench.io import write_text
from attrbench.tasks import Batch, Task, select
from attrbench.training.trainer import train
from attrbench.training.trajectory import DTYPES, Trajectory, checkpoint_steps

log = logging.getLogger(__name__)

TABLE = "system"
METHOD = "adamw_influence"


def run_system_study(experiment, trajectory, stages: dict, groundtruth, run_dir: Path) -> pd.DataFrame:
    """Run every comparison of the module docstring and write ``system.csv`` and ``system.md``.

    Only the scored test functions (``evaluation.num_scored``) enter, as in the Spearman table.
    """
    from attrbench.pipeline import influence_for, num_scored

    cfg = experiment.config
    options = cfg.analysis
    scored = num_scored(experiment)
    reference_scores = influence_for(experiment, trajectory, stages, METHOD)
    reference = Reference(groundtruth.samples, groundtruth.delta[:scored],
                          reference_scores.predicted_delta(cfg.groundtruth.removal), scored)

    # The reference row's time is AdamW-influence's, like the storage and checkpoint rows.
    rows = [reference.row("reference", "float64 training, ground truth and influence", reference.predicted,
                          reference.delta, stages[METHOD].record()["elapsed_seconds"])]
    rows += precision_rows(experiment, trajectory, reference, run_dir)
    rows += [storage_row(experiment, trajectory, reference, name) for name in options.storage_dtypes]
    rows += checkpoint_rows(experiment, trajectory, reference, list(options.checkpoint_every))
    rows += noise_floor_rows(experiment, trajectory, reference, int(options.noise_floor_chunk_size))
    table = pd.DataFrame(rows)
    # Most changes are orders of magnitude apart, so the Markdown table uses significant digits.
    write_text(run_dir / f"{TABLE}.csv", table.to_csv(index=False))
    write_text(run_dir / f"{TABLE}.md", format_markdown(table, floatfmt=".4g"))
    return table


@dataclasses.dataclass
class Reference:
    """The float64 run every variant is compared with."""

    samples: torch.Tensor
    delta: torch.Tensor
    predicted: torch.Tensor
    scored: int

    def test_data(self, experiment) -> Batch:
        """The scored test functions of ``experiment`` (the first ``scored``)."""
        return select(experiment.data.test, slice(0, self.scored))

    def row(self, study: str, variant: str, predicted: torch.Tensor | None, delta: torch.Tensor,
            seconds: float, **extra) -> dict:
        """Build one table row: Spearman, score change and ground-truth change against the reference."""
        row = {"study": study, "variant": variant}
        if predicted is not None:
            scores = predicted[:, self.samples].double()
            row["spearman"] = mean_spearman(scores, delta.double())
            row["spearman_vs_reference"] = mean_spearman(scores, self.delta)
            row["score_max_relative_change"] = max_relative_change(scores, self.predicted[:, self.samples])
            row["score_median_relative_change"] = median_relative_change(scores, self.predicted[:, self.samples])
        row.update(groundtruth_change(delta, self.delta))
        row["seconds"] = round(seconds, 2)
        row.update(extra)
        return row


def mean_spearman(predicted: torch.Tensor, delta: torch.Tensor) -> float:
    return float(np.nanmean(rowwise_correlations(predicted.numpy(), delta.numpy()).spearman))


def max_relative_change(values: torch.Tensor, reference: torch.Tensor) -> float:
    """Return ``max |values - reference| / max |reference|``."""
    return float((values.double() - reference.double()).abs().max() / reference.double().abs().max())


def median_relative_change(values: torch.Tensor, reference: torch.Tensor) -> float:
    """Return ``median |values - reference| / median |reference|``, the typical relative change.

    Unlike :func:`max_relative_change` it ignores a few blown-up entries.
    """
    difference = (values.double() - reference.double()).abs().median()
    return float(difference / reference.double().abs().median())


def groundtruth_change(delta: torch.Tensor, reference: torch.Tensor) -> dict:
    """Measure the largest change of the ground truth, also relative to the mean and largest effect."""
    difference = float((delta.double() - reference.double()).abs().max())
    return {
        "groundtruth_max_abs_change": difference,
        "groundtruth_change_over_mean_effect": difference / float(reference.double().abs().mean()),
        "groundtruth_change_over_max_effect": difference / float(reference.double().abs().max()),
        "groundtruth_spearman_vs_reference": mean_spearman(delta.double(), reference.double()),
    }


def cast_trajectory(trajectory: Trajectory, dtype: torch.dtype) -> Trajectory:
    """Return the same recorded run, read (and replayed) in ``dtype``."""
    return dataclasses.replace(trajectory, dtype=dtype)


def sparse_trajectory(trajectory: Trajectory, every: int) -> Trajectory:
    """Keep every ``every``-th checkpoint only, so that the sweeps replay the steps in between."""
    steps = checkpoint_steps(trajectory.num_steps, every)
    states = {step: trajectory.state(step) for step in steps}
    return dataclasses.replace(trajectory, checkpoint_every=every, states=states, directory=None)


def nearest_state_trajectory(trajectory: Trajectory, every: int) -> Trajectory:
    """Keep every ``every``-th checkpoint and reuse the nearest one for each step.

    Every step t is replayed from the stored state nearest to t - 1 (ties go to the earlier
    one), with its step counter set to t - 1 so that the bias corrections stay right. Nothing
    between checkpoints is recomputed; only step t itself is taken, which the sweep needs for
    the step's gradient anyway. Where the nearest state is the initialization, the moments
    are zeros.
    """
    stored = checkpoint_steps(trajectory.num_steps, every)
    template = trajectory.state(stored[-1])
    states = {0: trajectory.state(0)}
    for step in range(1, trajectory.num_steps + 1):
        nearest = min(stored, key=lambda s: (abs(s - step), s))
        state = dict(trajectory.state(nearest))
        for key, value in template.items():
            if key == "step":
                state[key] = torch.tensor(float(step), dtype=value.dtype)
            elif key not in state:
                state[key] = torch.zeros_like(value)
        states[step] = state
    return dataclasses.replace(trajectory, checkpoint_every=1, states=states, directory=None)


def precision_rows(experiment, trajectory: Trajectory, reference: Reference, run_dir: Path) -> list[dict]:
    """Compare float32 for everything, for the ground truth only and for influence only."""
    from attrbench.pipeline import groundtruth_for, influence_for, train_stage_for

    cfg = experiment.config
    single = _experiment_with(experiment, dtype="float32")
    rows = []

    stages32: dict = {}
    trajectory32 = train_stage_for(single, stages32)
    groundtruth32, _ = groundtruth_for(single, trajectory32, stages32, run_dir)
    scores32 = influence_for(single, trajectory32, stages32, METHOD)
    # The stages may come from the cache, so their recorded times stand for this variant's time.
    seconds = sum(stage.record()["elapsed_seconds"] for stage in stages32.values())
    rows.append(reference.row("precision", "float32 training, ground truth and influence",
                              scores32.predicted_delta(cfg.groundtruth.removal),
                              groundtruth32.delta[: reference.scored], seconds))

    as_single = cast_trajectory(trajectory, torch.float32)
    start = time.perf_counter()
    delta = leave_one_out(single.task, single.data.train, reference.test_data(single), as_single,
                          reference.samples, cfg.groundtruth.removal, cfg.groundtruth.chunk_size, cfg.progress)
    rows.append(reference.row("precision", "float32 ground truth on the float64 run", reference.predicted,
                              delta, time.perf_counter() - start))

    start = time.perf_counter()
    scores = _influence(single, as_single, reference)
    rows.append(reference.row("precision", "float32 influence on the float64 run",
                              scores.predicted_delta(cfg.groundtruth.removal), reference.delta,
                              time.perf_counter() - start))
    return rows


def storage_row(experiment, trajectory: Trajectory, reference: Reference, dtype_name: str) -> dict:
    """Run AdamW-influence on the run's checkpoints stored in ``dtype_name`` and read back."""
    if dtype_name not in DTYPES:
        raise ValueError(f"analysis.storage_dtypes contains {dtype_name!r}; use some of {', '.join(DTYPES)}")
    cfg = experiment.config
    with tempfile.TemporaryDirectory(prefix="attrbench-storage-") as directory:
        # save() repoints the trajectory it is called on, so save a copy.
        dataclasses.replace(trajectory).save(directory, storage_dtype=DTYPES[dtype_name])
        stored_bytes = sum(path.stat().st_size for path in Path(directory).rglob("*.safetensors"))
        stored = Trajectory.load(directory)
        start = time.perf_counter()
        scores = _influence(experiment, stored, reference)
        seconds = time.perf_counter() - start
    return reference.row("storage", f"checkpoints stored in {dtype_name}",
                         scores.predicted_delta(cfg.groundtruth.removal), reference.delta, seconds,
                         stored_megabytes=round(stored_bytes / 2**20, 2))


def checkpoint_rows(experiment, trajectory: Trajectory, reference: Reference, spacings: list[int]) -> list[dict]:
    """Compare a checkpoint every k steps with exact recomputation and with nearest-state reuse."""
    cfg = experiment.config
    rows = []
    for every in spacings:
        if every < 1:
            raise ValueError(f"analysis.checkpoint_every contains {every}; every spacing must be at least 1")
        stored_count = len(checkpoint_steps(trajectory.num_steps, every))
        for variant, build in (("exact recomputation", sparse_trajectory),
                               ("nearest stored state", nearest_state_trajectory)):
            start = time.perf_counter()
            scores = _influence(experiment, build(trajectory, every), reference)
            rows.append(reference.row("checkpoints", f"every {every} steps, {variant}",
                                      scores.predicted_delta(cfg.groundtruth.removal), reference.delta,
                                      time.perf_counter() - start, stored_checkpoints=stored_count))
    return rows


def noise_floor_rows(experiment, trajectory: Trajectory, reference: Reference, chunk_size: int) -> list[dict]:
    """Rerun the ground truth in float64 and float32, and repeat the training run."""
    from attrbench.pipeline import train_stage_for

    cfg = experiment.config
    rows = []
    single = _experiment_with(experiment, dtype="float32")
    trajectory32 = train_stage_for(single, {})
    for exp, run in ((experiment, trajectory), (single, trajectory32)):
        for result in noise_floor(exp.task, exp.data.train, reference.test_data(exp), run, reference.samples,
                                  cfg.groundtruth.removal, cfg.groundtruth.chunk_size, chunk_size):
            rows.append({"study": "noise floor", **result})

    start = time.perf_counter()
    repeated = train(experiment.task, experiment.data.train, experiment.batches, experiment.lrs,
                     experiment.optimizer, checkpoint_every=trajectory.num_steps, progress=False)
    difference = float((repeated.final_parameters() - trajectory.final_parameters()).abs().max())
    rows.append({"study": "noise floor", "variant": "float64 training rerun, final parameters",
                 "groundtruth_max_abs_change": difference, "seconds": round(time.perf_counter() - start, 2)})
    return rows


def noise_floor(
    task: Task,
    train_data: Batch,
    test_data: Batch,
    trajectory: Trajectory,
    samples: torch.Tensor,
    removal: str,
    chunk_size: int,
    alternative_chunk_size: int,
) -> list[dict]:
    """Compute the leave-one-out ground truth three times and compare the reruns with the first.

    The second run repeats the first exactly (same stacks of counterfactual runs); in
    deterministic mode on CPU it must agree bit for bit. The third trains
    ``alternative_chunk_size`` counterfactuals per stack, which changes only the rounding of the
    batched kernels.

    Returns:
        Two rows with ``variant``, the largest absolute difference from the first run, and that
        difference over the mean and the largest absolute leave-one-out effect.
    """
    name = str(trajectory.dtype).removeprefix("torch.")
    first = leave_one_out(task, train_data, test_data, trajectory, samples, removal, chunk_size, progress=False)
    rows = []
    for label, size in (("identical rerun", chunk_size),
                        (f"rerun with {alternative_chunk_size} counterfactuals per stack", alternative_chunk_size)):
        start = time.perf_counter()
        rerun = leave_one_out(task, train_data, test_data, trajectory, samples, removal, size, progress=False)
        difference = float((rerun - first).abs().max())
        rows.append({
            "variant": f"{name} ground truth, {label}",
            "groundtruth_max_abs_change": difference,
            "groundtruth_change_over_mean_effect": difference / float(first.abs().mean()),
            "groundtruth_change_over_max_effect": difference / float(first.abs().max()),
            "seconds": round(time.perf_counter() - start, 2),
        })
    return rows


def _influence(experiment, trajectory: Trajectory, reference: Reference):
    """AdamW-influence of ``trajectory`` for the scored test functions, with ``experiment``'s task and data."""
    cfg = experiment.config
    return compute_influence(AdamWInfluence(), experiment.task, experiment.data.train,
                             reference.test_data(experiment), trajectory,
                             query_chunk_size=cfg.influence.query_chunk_size, progress=cfg.progress)


def _experiment_with(experiment, **overrides):
    """Rebuild the experiment from its config with top-level keys replaced and no analysis.

    The rebuilt experiment computes every ground-truth shard itself.
    """
    from attrbench.experiment import build_experiment

    cfg = OmegaConf.merge(experiment.config, {**overrides, "analysis": None, "groundtruth": {"shard": None}})
    return build_experiment(cfg)
