"""Online selection: drop part of every batch during a new training run, then take the step.

At step t the run scores its own batch from its current state with :class:`LookaheadScorer`
(horizon K) and drops the ``round(fraction * |B_t|)`` lowest scores, or, for the ``random``
baseline, the same number of samples chosen at random. The real optimizer step then takes the
mean loss over the remaining samples. At least one sample of every batch is kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from attrbench.selection.lookahead import LookaheadScorer
from attrbench.tasks import Batch, Task, select
from attrbench.training.optim import OptimizerSpec, optimizer_step, read_state
from attrbench.training.schedule import BatchSchedule
from attrbench.training.trainer import TrainingDivergedError

log = logging.getLogger(__name__)

ONLINE_POLICIES = ("lookahead", "random")


@dataclass
class SelectionRun:
    """A training run after selection, and what was dropped.

    Attributes:
        theta: Final parameters.
        batches: The original batch schedule.
        kept: The batches the run actually trained on (a skipped step has no row).
        lrs: Learning rate of each step of ``kept``.
        dropped: ``[T, max_batch]`` mask over ``batches.indices``: True where a sample was dropped.
        step_scores: Online look-ahead scores aligned with ``batches.indices`` (NaN where none).
        sample_scores: Offline score of every training sample ``[N]``.
    """

    theta: torch.Tensor
    batches: BatchSchedule
    kept: BatchSchedule
    lrs: list[float]
    dropped: torch.Tensor
    step_scores: torch.Tensor | None = None
    sample_scores: torch.Tensor | None = None

    @property
    def num_dropped(self) -> int:
        return int(self.dropped.sum())


def drop_count(size: int, fraction: float) -> int:
    """Samples dropped from a batch of ``size``: ``fraction * size`` rounded half up, keeping one."""
    return max(0, min(size - 1, math.floor(fraction * size + 0.5)))


def check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"selection.fraction={fraction!r} is not a number; write it as 0.2")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"selection.fraction={fraction} must lie in [0, 1)")


def train_online(
    task: Task,
    train_data: Batch,
    validation: Batch,
    batches: BatchSchedule,
    lrs: list[float],
    optimizer: OptimizerSpec,
    policy: str,
    fraction: float,
    horizon: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> SelectionRun:
    """Train from the task's initialization, dropping part of each batch before its step.

    Args:
        policy: ``lookahead`` (drop the lowest K-step look-ahead scores) or ``random``.
        fraction: Share of each batch to drop, in [0, 1).
        horizon: K for ``lookahead``. The ``random`` policy ignores it.
        seed: Seed of the ``random`` policy's choices.

    Raises:
        ValueError: On an unknown policy, a fraction outside [0, 1) or a negative horizon.
        TrainingDivergedError: If a training loss becomes NaN or infinite.
    """
    if policy not in ONLINE_POLICIES:
        raise ValueError(f"online policy {policy!r} is not one of {', '.join(ONLINE_POLICIES)}")
    check_fraction(fraction)
    if horizon < 0:
        raise ValueError(f"selection.horizon={horizon} must be at least 0")
    if len(lrs) != batches.num_steps:
        raise ValueError(f"{len(lrs)} learning rates for {batches.num_steps} steps")

    theta = task.initial_parameters().requires_grad_(True)
    torch_optimizer = optimizer.build(theta, lr=lrs[0])
    scorer = (
        LookaheadScorer(task, train_data, validation, batches, lrs, optimizer)
        if policy == "lookahead"
        else None
    )
    generator = torch.Generator().manual_seed(seed)
    dropped = torch.zeros(batches.indices.shape, dtype=torch.bool)
    step_scores = torch.full(batches.indices.shape, float("nan"), dtype=theta.dtype)
    kept_batches = []

    description = f"online {policy}" + (f" K={horizon}" if scorer else "")
    for step in tqdm(range(1, batches.num_steps + 1), desc=description, disable=not progress, leave=False):
        batch_index = batches.batch(step)
        size = len(batch_index)
        count = drop_count(size, fraction)
        if scorer is not None:
            scores = scorer.score(read_state(torch_optimizer, theta), step, horizon).score.cpu()
            step_scores[step - 1, :size] = scores
            drop_positions = torch.argsort(scores, stable=True)[:count]
        else:
            drop_positions = torch.randperm(size, generator=generator)[:count]
        dropped[step - 1, drop_positions] = True
        kept = batch_index[~dropped[step - 1, :size]]
        _take_step(task, train_data, torch_optimizer, theta, kept, lrs[step - 1], step)
        kept_batches.append(kept)

    return SelectionRun(
        theta=theta.detach(),
        batches=batches,
        kept=BatchSchedule.from_batches(kept_batches),
        lrs=list(lrs),
        dropped=dropped,
        step_scores=step_scores if scorer is not None else None,
    )


def _take_step(task, train_data, torch_optimizer, theta, kept: torch.Tensor, lr: float, step: int) -> None:
    """Take one real optimizer step on the mean loss of the ``kept`` samples (as :func:`train` takes it)."""
    kept = kept.to(theta.device)
    weights = torch.ones(len(kept), dtype=theta.dtype, device=theta.device)
    with torch.no_grad():
        gradient, losses = task.batch_gradient(theta.detach(), select(train_data, kept), weights, len(kept))
    if not torch.isfinite(losses).all():
        raise TrainingDivergedError(
            f"training loss is not finite at step {step} of the selection run; lower optimizer.lr "
            "or use dtype=float64"
        )
    optimizer_step(torch_optimizer, theta, gradient, lr)
