"""Train with trajectory recording, and replay a recorded run step by step.

One step is: take the step's batch, compute the gradient of its mean loss at the current
parameters (:meth:`Task.batch_gradient`), and apply the real torch optimizer with the step's
learning rate. Training and replay share :func:`_step`, so replayed states equal the recorded
ones bit for bit on a deterministic backend.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attrbench.tasks import Batch, Task, select
from attrbench.training.optim import OptimizerSpec, load_state, optimizer_step, read_state
from attrbench.training.schedule import BatchSchedule
from attrbench.training.trajectory import Trajectory, TrajectoryWriter

log = logging.getLogger(__name__)


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class StepRecord:
    """What the reverse sweeps need about step ``t``.

    Attributes:
        step: 1-based step index t.
        theta_before: Parameters theta_{t-1} at which the batch gradient was taken.
        gradient: Batch gradient g_t = grad L_t(theta_{t-1}) (all weights 1).
        state_after: Parameters and optimizer state after the update (theta_t, m_t, v_t).
    """

    step: int
    theta_before: torch.Tensor
    gradient: torch.Tensor
    state_after: dict[str, torch.Tensor]


def train(
    task: Task,
    train_data: Batch,
    batches: BatchSchedule,
    lrs: list[float],
    optimizer: OptimizerSpec,
    checkpoint_every: int = 1,
    progress: bool = True,
    directory: str | Path | None = None,
    storage_dtype: torch.dtype | None = None,
) -> Trajectory:
    """Train from the task's initialization and record the trajectory.

    Args:
        directory: If given, each checkpoint is written there as soon as it is taken (cast to
            ``storage_dtype``) and none is kept in memory; the returned trajectory reads them
            back from disk. Otherwise all checkpoints stay in memory.
    """
    if len(lrs) != batches.num_steps:
        raise ValueError(f"{len(lrs)} learning rates for {batches.num_steps} steps")
    theta = task.initial_parameters().requires_grad_(True)
    torch_optimizer = optimizer.build(theta, lr=lrs[0] if lrs else 0.0)
    trajectory = Trajectory(
        layout=task.layout,
        optimizer=optimizer,
        batches=batches,
        lrs=list(lrs),
        checkpoint_every=checkpoint_every,
        dtype=theta.dtype,
    )
    writer = TrajectoryWriter(directory, storage_dtype or theta.dtype) if directory is not None else None

    def record(step: int) -> None:
        state = read_state(torch_optimizer, theta)
        if writer is None:
            trajectory.states[step] = state
        else:
            writer.write_checkpoint(step, state)

    keep = set(trajectory.checkpoint_steps)
    record(0)
    for step in tqdm(range(1, batches.num_steps + 1), desc="train", disable=not progress, leave=False):
        _step(task, train_data, batches, lrs, torch_optimizer, theta, step)
        if step in keep:
            record(step)
    if writer is not None:
        writer.finish(trajectory)
    return trajectory


def _step(task, train_data, batches, lrs, torch_optimizer, theta, step) -> torch.Tensor:
    """Apply step ``step`` in place and return its batch gradient."""
    batch_index = batches.batch(step).to(theta.device)
    batch = select(train_data, batch_index)
    weights = torch.ones(len(batch_index), dtype=theta.dtype, device=theta.device)
    with torch.no_grad():
        gradient, losses = task.batch_gradient(theta.detach(), batch, weights, len(batch_index))
    if not torch.isfinite(losses).all():
        bad = batch_index[~torch.isfinite(losses)].tolist()
        raise TrainingDivergedError(
            f"training loss is not finite at step {step} (training samples {bad[:10]}); "
            "lower optimizer.lr or use dtype=float64"
        )
    optimizer_step(torch_optimizer, theta, gradient, lrs[step - 1])
    return gradient


def replay(
    task: Task, train_data: Batch, trajectory: Trajectory, start: int, stop: int, device="cpu"
) -> Iterator[StepRecord]:
    """Recompute steps ``start + 1 .. stop`` from the stored checkpoint at ``start``.

    Yields one :class:`StepRecord` per step, in forward order.
    """
    state = trajectory.state(start, device)
    theta = state["theta"].clone().requires_grad_(True)
    torch_optimizer = trajectory.optimizer.build(theta, lr=0.0)
    load_state(torch_optimizer, theta, state)
    for step in range(start + 1, stop + 1):
        theta_before = theta.detach().clone()
        gradient = _step(task, train_data, trajectory.batches, trajectory.lrs, torch_optimizer, theta, step)
        yield StepRecord(step, theta_before, gradient, read_state(torch_optimizer, theta))


def reverse_steps(task: Task, train_data: Batch, trajectory: Trajectory, device="cpu") -> Iterator[StepRecord]:
    """Yield the records of steps T, T-1, ..., 1.

    Each segment between two stored checkpoints is replayed forward once and then walked
    backwards, so memory holds at most ``checkpoint_every`` states at a time.
    """
    stored = trajectory.checkpoint_steps
    for start, stop in reversed(list(zip(stored[:-1], stored[1:]))):
        yield from reversed(list(replay(task, train_data, trajectory, start, stop, device)))
