"""The reverse sweep shared by all trajectory influence methods.

Let ``a_t = dF/dtheta_t`` for a test function F. A method's adjoint step for update t receives
``a_t`` (and any optimizer-state adjoints), chooses a direction ``u_t`` such that

    dF/dw_{i,t} = <u_t, grad l_i(theta_{t-1})> / |B_t|     for each sample i of batch B_t,
    a_{t-1}     = (1 - eta_t lambda) a_t + H_t u_t          (plus method-specific terms),

and the engine evaluates both with one forward-over-reverse pass per step
(:meth:`Task.hvp_and_sample_dots`), for a whole chunk of test functions at once.

The first-order prediction of removing sample j is then
``keep_denominator``: ``-sum_t dF/dw_{j,t}``;
``renormalize``: that, plus ``sum_t (sum_{i in B_t, i != j} dF/dw_{i,t}) / (|B_t| - 1)``, because
dropping j and renormalising the mean raises every other weight of the batch by ``1/(|B_t| - 1)``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from attrbench.tasks import Batch, Task, num_samples, select
from attrbench.training.optim import OptimizerSpec
from attrbench.training.trainer import StepRecord, reverse_steps
from attrbench.training.trajectory import Trajectory

log = logging.getLogger(__name__)

HvpAndDots = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class InfluenceMethod(ABC):
    """One optimizer's adjoint recurrence."""

    name: str = ""
    # False: the method scores every training sample with one reverse sweep per chunk of test
    # functions. :class:`SampleInfluenceMethod` sets it to True.
    needs_samples: bool = False

    def check_optimizer(self, optimizer: OptimizerSpec) -> None:
        """Raise ValueError if the method cannot be applied to runs of this optimizer."""

    @abstractmethod
    def initial_adjoint(self, test_gradients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adjoint state at the final step, given ``grad F(theta_T)`` of shape ``[Q, P]``."""

    @abstractmethod
    def backward_step(
        self,
        adjoint: dict[str, torch.Tensor],
        record: StepRecord,
        lr: float,
        hyperparameters: dict,
        hvp_and_dots: HvpAndDots,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Move the adjoint from after step t to before it.

        Returns:
            The new adjoint and ``dF/dw_{i,t}`` for the batch's samples, shape ``[Q, B]``.
        """


class SampleInfluenceMethod(ABC):
    """A method that scores only the given attributed samples (forward mode, one chain per sample).

    :func:`compute_influence` passes it the attributed samples and the removal semantics, which
    such a method needs because it follows each sample's removal path directly.
    """

    name: str = ""
    needs_samples: bool = True

    def check_optimizer(self, optimizer: OptimizerSpec) -> None:
        """Raise ValueError if the method cannot be applied to runs of this optimizer."""

    @abstractmethod
    def compute(
        self,
        task: Task,
        train_data: Batch,
        test_data: Batch,
        trajectory: Trajectory,
        samples: torch.Tensor,
        removal: str,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ):
        """Return scores whose ``predicted_delta(removal)`` is ``[Q, N]`` (NaN outside ``samples``)."""


@dataclass
class InfluenceScores:
    """Derivatives of the test losses with respect to every training sample's weight.

    Attributes:
        derivative: ``[Q, N]`` sum over steps of ``dF_q/dw_{j,t}``.
        renormalize_correction: ``[Q, N]`` first-order effect of renormalising the batch means.
    """

    derivative: torch.Tensor
    renormalize_correction: torch.Tensor

    def predicted_delta(self, removal: str) -> torch.Tensor:
        """First-order prediction of ``F(without j) - F`` for every test function and sample."""
        if removal == "keep_denominator":
            return -self.derivative
        if removal == "renormalize":
            return -self.derivative + self.renormalize_correction
        raise ValueError(f"removal={removal!r} is not one of keep_denominator, renormalize")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"derivative": self.derivative, "renormalize_correction": self.renormalize_correction}


def compute_influence(
    method: InfluenceMethod | SampleInfluenceMethod,
    task: Task,
    train_data: Batch,
    test_data: Batch,
    trajectory: Trajectory,
    query_chunk_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    samples: torch.Tensor | None = None,
    removal: str = "keep_denominator",
):
    """Run the method's reverse sweep for every test function, ``query_chunk_size`` at a time.

    A :class:`SampleInfluenceMethod` instead scores only ``samples`` along the ``removal`` path.

    Raises:
        ValueError: If the method needs ``samples`` and none are given.
    """
    method.check_optimizer(trajectory.optimizer)
    if method.needs_samples:
        if samples is None:
            raise ValueError(f"influence method {method.name!r} scores only the attributed samples; pass samples=")
        return method.compute(task, train_data, test_data, trajectory, samples, removal, device, progress)
    if query_chunk_size < 1:
        raise ValueError(f"influence.query_chunk_size={query_chunk_size} must be at least 1")
    num_queries, num_train = num_samples(test_data), num_samples(train_data)
    derivative = torch.zeros(num_queries, num_train, dtype=trajectory.dtype)
    correction = torch.zeros_like(derivative)
    final_theta = trajectory.final_parameters(device)
    starts = range(0, num_queries, query_chunk_size)
    bar = tqdm(total=len(starts) * trajectory.num_steps, desc=method.name, disable=not progress, leave=False)

    for start in starts:
        queries = slice(start, min(start + query_chunk_size, num_queries))
        test_gradients = task.sample_gradients(final_theta, select(test_data, queries))
        chunk = sweep(method, task, train_data, trajectory, test_gradients, device, on_step=lambda *_: bar.update())
        derivative[queries] = chunk.derivative.cpu()
        correction[queries] = chunk.renormalize_correction.cpu()
    bar.close()
    return InfluenceScores(derivative, correction)


def sweep(
    method: InfluenceMethod,
    task: Task,
    train_data: Batch,
    trajectory: Trajectory,
    test_gradients: torch.Tensor,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> InfluenceScores:
    """Run one reverse sweep for the test functions whose final gradients are ``test_gradients``.

    ``on_step(step, batch_index, dF/dw_{i,t})`` is called for every step, last step first.
    """
    num_queries, num_train = test_gradients.shape[0], num_samples(train_data)
    derivative = torch.zeros(num_queries, num_train, dtype=test_gradients.dtype, device=device)
    correction = torch.zeros_like(derivative)
    hyperparameters = trajectory.optimizer.hyperparameters()
    adjoint = method.initial_adjoint(test_gradients)

    for record in reverse_steps(task, train_data, trajectory, device):
        batch_index = trajectory.batches.batch(record.step).to(device)
        batch = select(train_data, batch_index)

        def hvp_and_dots(directions: torch.Tensor, batch=batch, theta=record.theta_before):
            return task.hvp_and_sample_dots(theta, batch, directions)

        lr = trajectory.lrs[record.step - 1]
        adjoint, sample_derivative = method.backward_step(adjoint, record, lr, hyperparameters, hvp_and_dots)
        derivative.index_add_(1, batch_index, sample_derivative)
        correction.index_add_(1, batch_index, _renormalize_terms(sample_derivative))
        if on_step is not None:
            on_step(record.step, batch_index, sample_derivative)
    return InfluenceScores(derivative, correction)


def _renormalize_terms(sample_derivative: torch.Tensor) -> torch.Tensor:
    size = sample_derivative.shape[1]
    if size < 2:
        return torch.zeros_like(sample_derivative)
    total = sample_derivative.sum(dim=1, keepdim=True)
    return (total - sample_derivative) / (size - 1)
