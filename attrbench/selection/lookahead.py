"""K-step look-ahead scores: a batch member's effect on the validation loss K steps later.

For step t of a run with T steps, horizon K and ``e = min(t + K, T)``, the score of sample z in
batch B_t is built from the derivative

    d_z = dF/dw_{z,t},   F = mean validation loss at theta_e,

where w_{z,t} is z's weight in the step-t batch loss and steps t+1..e follow the batch schedule
with the real optimizer. :class:`LookaheadScorer` evaluates it from a given optimizer state
(theta_{t-1} and the moments): it simulates steps t..e with the torch optimizer
(:func:`attrbench.training.trainer.replay`), starts the optimizer's adjoint at ``grad F(theta_e)``
and runs it back over steps e..t+1 with one Hessian-vector product each
(:meth:`Task.hvp_and_sample_dots`). At step t only the per-sample dots are needed, so a cheaper
forward-mode pass on the per-sample losses gives them. One sweep scores the whole batch. K = 0
is the step's own effect on the validation loss through the optimizer update, and K >= T - t is
the effect on the final model.

Sign convention (the project's): a score is the first-order predicted change
``F(without z) - F`` when z is removed from step t's batch and the batch mean is taken over the
remaining samples (``renormalize``). A negative score means removing z is predicted to lower the
validation loss, so z is harmful; selection drops the lowest scores. Within one batch this ranks
samples exactly as ``-d_z`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import jvp, vmap

from attrbench.influence.adamw import AdamWInfluence
from attrbench.influence.base import InfluenceMethod
from attrbench.influence.sgd import SGDInfluence
from attrbench.tasks import Batch, Task, num_samples, select
from attrbench.training.optim import OptimizerSpec
from attrbench.training.schedule import BatchSchedule
from attrbench.training.trainer import replay
from attrbench.training.trajectory import Trajectory


def adjoint_method(optimizer: OptimizerSpec) -> InfluenceMethod:
    """Return the exact adjoint recurrence of the optimizer the run uses.

    Raises:
        ValueError: For an optimizer without one.
    """
    if optimizer.name in ("AdamW", "Adam"):
        return AdamWInfluence()
    if optimizer.name == "SGD":
        return SGDInfluence()
    raise ValueError(
        f"look-ahead selection has no adjoint for optimizer {optimizer.target}; use AdamW, Adam or SGD"
    )


def validation_gradient(task: Task, theta: torch.Tensor, validation: Batch) -> torch.Tensor:
    """Gradient ``[P]`` of the mean validation loss at ``theta``."""
    size = num_samples(validation)
    weights = torch.ones(size, dtype=theta.dtype, device=theta.device)
    with torch.no_grad():
        gradient, _ = task.batch_gradient(theta.detach(), validation, weights, size)
    return gradient


def sample_dots(task: Task, theta: torch.Tensor, batch: Batch, directions: torch.Tensor) -> torch.Tensor:
    """Return ``<grad l_i(theta), u>`` ``[Q, B]`` for each direction u ``[Q, P]`` and sample i.

    One forward-mode pass on the per-sample losses per micro-batch, with no Hessian-vector
    product: the dots half of :meth:`Task.hvp_and_sample_dots` at a fraction of its cost.
    """
    size = num_samples(batch)
    step = task.micro_batch_size or size
    parts = []
    for start in range(0, size, step):
        part = select(batch, slice(start, min(start + step, size)))

        def losses_along(direction, part=part):
            _, tangent = jvp(lambda th: task.per_sample_loss(th, part), (theta,), (direction,))
            return tangent

        parts.append(vmap(losses_along)(directions))
    return torch.cat(parts, dim=1)


def renormalized_delta(derivative: torch.Tensor) -> torch.Tensor:
    """First-order ``F(without z) - F`` for each z of one batch, given ``dF/dw`` ``[..., B]``.

    Removing z and renormalising the mean raises every other weight by ``1 / (B - 1)``. A batch
    of one sample keeps the plain ``-dF/dw_z``.
    """
    size = derivative.shape[-1]
    if size < 2:
        return -derivative
    total = derivative.sum(dim=-1, keepdim=True)
    return -derivative + (total - derivative) / (size - 1)


@dataclass
class LookaheadScores:
    """Scores of one step's batch.

    Attributes:
        step: The scored step t (1-based).
        end: The step ``min(t + K, T)`` whose validation loss is predicted.
        batch_index: The batch's training-sample indices ``[B]``.
        derivative: ``dF/dw_{z,t}`` ``[B]``.
        score: Predicted ``F(without z) - F`` ``[B]``; negative means harmful.
    """

    step: int
    end: int
    batch_index: torch.Tensor
    derivative: torch.Tensor
    score: torch.Tensor


class LookaheadScorer:
    """Scores batch members with horizon K from any optimizer state of a run.

    Args:
        task: The model and loss.
        train_data: Training samples the schedule indexes.
        validation: Validation samples, whose mean loss is F.
        batches: The full batch schedule (steps after t are simulated with these batches).
        lrs: Learning rate of each step.
        optimizer: The run's optimizer; its adjoint is chosen by :func:`adjoint_method`.
    """

    def __init__(
        self,
        task: Task,
        train_data: Batch,
        validation: Batch,
        batches: BatchSchedule,
        lrs: list[float],
        optimizer: OptimizerSpec,
    ):
        if len(lrs) != batches.num_steps:
            raise ValueError(f"{len(lrs)} learning rates for {batches.num_steps} steps")
        self.task, self.train_data, self.validation = task, train_data, validation
        self.batches, self.lrs, self.optimizer = batches, list(lrs), optimizer
        self.method = adjoint_method(optimizer)
        self.hyperparameters = optimizer.hyperparameters()

    def score(self, state: dict[str, torch.Tensor], step: int, horizon: int) -> LookaheadScores:
        """Score the batch of ``step`` from the state before it.

        Args:
            state: Parameters and optimizer state after ``step - 1`` updates, as
                :func:`attrbench.training.optim.read_state` returns them.
            step: The step t to score, 1..T.
            horizon: K >= 0. The validation loss is taken after step ``min(t + K, T)``.
        """
        num_steps = self.batches.num_steps
        if not 1 <= step <= num_steps:
            raise ValueError(f"step {step} is outside 1..{num_steps}")
        if horizon < 0:
            raise ValueError(f"selection.horizon={horizon} must be at least 0")
        end = min(step + horizon, num_steps)
        records = self._simulate(state, step, end)

        theta_end = records[-1].state_after["theta"]
        adjoint = self.method.initial_adjoint(
            validation_gradient(self.task, theta_end, self.validation)[None]
        )
        for record in reversed(records[1:]):
            batch = select(self.train_data, self.batches.batch(record.step).to(theta_end.device))

            def hvp_and_dots(directions, theta=record.theta_before, batch=batch):
                return self.task.hvp_and_sample_dots(theta, batch, directions)

            adjoint, _ = self.method.backward_step(
                adjoint, record, self.lrs[record.step - 1], self.hyperparameters, hvp_and_dots
            )

        first = records[0]
        batch_index = self.batches.batch(step).to(theta_end.device)
        batch = select(self.train_data, batch_index)

        def dots_only(directions):
            # The adjoint before step t is never used, so its Hessian-vector product is skipped.
            return torch.zeros_like(directions), sample_dots(self.task, first.theta_before, batch, directions)

        _, derivative = self.method.backward_step(
            adjoint, first, self.lrs[step - 1], self.hyperparameters, dots_only
        )
        derivative = derivative[0]
        return LookaheadScores(step, end, batch_index, derivative, renormalized_delta(derivative))

    def _simulate(self, state: dict[str, torch.Tensor], step: int, end: int) -> list:
        """Run steps ``step..end`` from ``state`` with the real optimizer, one record per step."""
        window = Trajectory(
            layout=self.task.layout,
            optimizer=self.optimizer,
            batches=self.batches,
            lrs=self.lrs,
            checkpoint_every=1,
            dtype=state["theta"].dtype,
            states={step - 1: state},
        )
        return list(replay(self.task, self.train_data, window, step - 1, end, state["theta"].device))
