"""Offline selection: score every sample on a finished reference run, drop globally, retrain.

The offline score of training sample z is the look-ahead score with K = T - t at every step it
appears in, summed: the first-order change of the final mean validation loss when z is removed
from every batch of the reference run (batch means renormalised over the remaining samples).
One adjoint sweep over the reference trajectory (:func:`attrbench.influence.base.sweep`) with the
validation gradient as its single test function gives all of them. The lowest scores (most
harmful) are dropped and the run is retrained on the same batch schedule without them.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from attrbench.influence.base import sweep
from attrbench.selection.lookahead import adjoint_method, validation_gradient
from attrbench.selection.online import SelectionRun, check_fraction, drop_count
from attrbench.tasks import Batch, Task
from attrbench.training.schedule import BatchSchedule
from attrbench.training.trainer import train
from attrbench.training.trajectory import Trajectory

log = logging.getLogger(__name__)


def offline_scores(
    task: Task,
    train_data: Batch,
    validation: Batch,
    trajectory: Trajectory,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Predicted ``F(without z) - F`` ``[N]`` of the final mean validation loss F for every sample."""
    method = adjoint_method(trajectory.optimizer)
    gradient = validation_gradient(task, trajectory.final_parameters(device), validation)
    bar = tqdm(total=trajectory.num_steps, desc="offline scores", disable=not progress, leave=False)
    scores = sweep(
        method, task, train_data, trajectory, gradient[None], device, on_step=lambda *_: bar.update()
    )
    bar.close()
    return scores.predicted_delta("renormalize")[0]


def lowest_scored(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` lowest scores, lowest first. Ties keep the lower position first."""
    if not 0 <= count <= len(scores):
        raise ValueError(f"cannot drop {count} of {len(scores)} scored samples")
    return torch.argsort(scores, stable=True)[:count]


def schedule_without(
    batches: BatchSchedule, lrs: list[float], dropped: torch.Tensor
) -> tuple[BatchSchedule, list[float], list[int]]:
    """Remove the ``dropped`` samples from every batch of the schedule.

    Each batch keeps its other samples in their order. A step whose batch loses every sample is
    skipped together with its learning rate.

    Returns:
        The reduced schedule, its learning rates and the original 1-based step of each kept step.
    """
    dropped_set = torch.zeros(int(batches.indices.max()) + 1, dtype=torch.bool)
    dropped_set[dropped.cpu()] = True
    kept_batches, kept_lrs, kept_steps = [], [], []
    for step in range(1, batches.num_steps + 1):
        batch = batches.batch(step)
        kept = batch[~dropped_set[batch]]
        if len(kept) == 0:
            continue
        kept_batches.append(kept)
        kept_lrs.append(lrs[step - 1])
        kept_steps.append(step)
    if not kept_batches:
        raise ValueError("every batch lost all of its samples; lower selection.fraction")
    skipped = batches.num_steps - len(kept_steps)
    if skipped:
        log.warning("offline selection: %d steps lost every sample and are skipped", skipped)
    return BatchSchedule.from_batches(kept_batches), kept_lrs, kept_steps


def train_offline(
    task: Task,
    train_data: Batch,
    validation: Batch,
    reference: Trajectory,
    fraction: float,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SelectionRun:
    """Score every sample on ``reference``, drop the lowest ``fraction`` of them and retrain.

    The retrained run starts from the same initialization as the reference run (the task's) and
    uses its batch schedule, learning rates and optimizer, minus the dropped samples.
    """
    check_fraction(fraction)
    scores = offline_scores(task, train_data, validation, reference, device, progress)
    dropped_samples = lowest_scored(scores.cpu(), drop_count(len(scores), fraction))
    kept, kept_lrs, _ = schedule_without(reference.batches, reference.lrs, dropped_samples)
    retrained = train(
        task,
        train_data,
        kept,
        kept_lrs,
        reference.optimizer,
        checkpoint_every=kept.num_steps,
        progress=progress,
    )
    return SelectionRun(
        theta=retrained.final_parameters(device),
        batches=reference.batches,
        kept=kept,
        lrs=kept_lrs,
        dropped=torch.isin(reference.batches.indices, dropped_samples),
        sample_scores=scores.cpu(),
    )
