"""Second-order influence: the first-order estimate plus the exact second-order Taylor term.

Removing training sample j moves the sample weights along a straight path ``w(alpha)`` from the
recorded run (alpha = 0) to the run without j (alpha = 1). Under ``keep_denominator`` only
``w_j = 1 - alpha`` changes. Under ``renormalize`` every other sample of a batch that contains j
gets ``1 + alpha / (|B_t| - 1)``, so at alpha = 1 the batch loss is the mean over the other
``|B_t| - 1`` samples (a batch of one sample keeps its denominator and loses its only term).
The test losses then expand as

    delta_j = F(1) - F(0) = F'(0) + F''(0) / 2 + O(F''')

and this method predicts ``F'(0) + F''(0) / 2``. Under ``keep_denominator``, ``F'(0) = -dF/dw_j``
(AdamW-influence's first-order estimate) and ``F''(0) = d2F/dw_j^2``.

Both derivatives come from forward tangents of the optimizer state ``x_t = (theta_t, m_t, v_t)``
along the recorded run, without retraining. With ``Phi_t`` the update of step t,

    x'_t  = J_t x'_{t-1} + dPhi_t/dalpha
    x''_t = J_t x''_{t-1} + D2Phi_t[(x'_{t-1}, 1), (x'_{t-1}, 1)]

for each attributed sample. The batch gradient's tangents come from one nested
``jvp`` of the model along ``theta_{t-1} + e theta'_{t-1} + e^2 theta''_{t-1} / 2`` with weights
``w(e)``, and the optimizer step's from its closed form (:mod:`attrbench.influence.tangents`). The
second derivative therefore contains every second-order source of the real update: the loss's
third derivative acting on the parameter tangent, the sample's own Hessian, and AdamW's
nonlinear dependence on the gradient through ``v`` and ``m / (sqrt(v) + eps)``. At the end ``F'``
and ``F''`` are the first and second derivatives of the test losses along
``theta_T + e theta'_T + e^2 theta''_T / 2``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from attrbench.groundtruth.loo import check_removal
from attrbench.influence.base import SampleInfluenceMethod
from attrbench.influence.tangents import (
    STATE_KEYS,
    forward_records,
    gradient_tangents,
    loss_path_derivatives,
    optimizer_tangents,
    weight_directions,
)
from attrbench.tasks import Batch, Task, num_samples, select
from attrbench.training.optim import OptimizerSpec
from attrbench.training.trajectory import Trajectory

log = logging.getLogger(__name__)

@dataclass
class SecondOrderScores:
    """First and second derivatives of the test losses along each attributed sample's removal path.

    Attributes:
        samples: ``[M]`` training-sample indices the columns refer to.
        removal: The removal semantics that define the path.
        first_derivative: ``[Q, M]`` ``F'(0)``, the first-order prediction of ``delta``.
        second_derivative: ``[Q, M]`` ``F''(0)``.
        num_train: Number of training samples, the width of :meth:`predicted_delta`.
    """

    samples: torch.Tensor
    removal: str
    first_derivative: torch.Tensor
    second_derivative: torch.Tensor
    num_train: int

    @property
    def second_order_term(self) -> torch.Tensor:
        """``[Q, M]`` ``F''(0) / 2``, the leading error term of the first-order prediction."""
        return 0.5 * self.second_derivative

    def predicted_delta(self, removal: str) -> torch.Tensor:
        """``[Q, N]`` second-order prediction of ``F(without j) - F``; NaN for samples not scored.

        Raises:
            ValueError: If ``removal`` is not the semantics these derivatives were taken along.
        """
        if removal != self.removal:
            raise ValueError(
                f"second-order scores were computed for removal={self.removal!r}, not {removal!r}; "
                "recompute them with the requested groundtruth.removal"
            )
        predicted = torch.full(
            (self.first_derivative.shape[0], self.num_train), float("nan"), dtype=self.first_derivative.dtype
        )
        predicted[:, self.samples] = self.first_derivative + self.second_order_term
        return predicted

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "samples": self.samples,
            "first_derivative": self.first_derivative,
            "second_derivative": self.second_derivative,
            "num_train": torch.tensor(self.num_train),
            "renormalize": torch.tensor(int(self.removal == "renormalize")),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SecondOrderScores:
        return cls(
            samples=tensors["samples"],
            removal="renormalize" if int(tensors["renormalize"]) else "keep_denominator",
            first_derivative=tensors["first_derivative"],
            second_derivative=tensors["second_derivative"],
            num_train=int(tensors["num_train"]),
        )


class SecondOrderInfluence(SampleInfluenceMethod):
    """``F'(0) + F''(0) / 2`` for each attributed sample, by nested forward tangents.

    Args:
        sample_chunk_size: Samples whose tangents are propagated together. Memory grows as
            ``6 * sample_chunk_size * P`` numbers; each chunk replays the recorded run once.
    """

    name = "second_order"

    def __init__(self, sample_chunk_size: int = 64):
        if sample_chunk_size < 1:
            raise ValueError(f"sample_chunk_size={sample_chunk_size} must be at least 1")
        self.sample_chunk_size = sample_chunk_size

    def check_optimizer(self, optimizer: OptimizerSpec) -> None:
        optimizer_tangents(optimizer)

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
    ) -> SecondOrderScores:
        check_removal(removal)
        samples = torch.as_tensor(samples, dtype=torch.long)
        first_steps = trajectory.batches.first_steps(samples)
        order = torch.argsort(first_steps, stable=True)
        num_queries = num_samples(test_data)
        first = torch.zeros(num_queries, len(samples), dtype=trajectory.dtype)
        second = torch.zeros_like(first)

        chunks = list(torch.split(order, self.sample_chunk_size))
        bar = tqdm(total=len(chunks), desc=self.name, disable=not progress, leave=False)
        for positions in chunks:
            chunk_first, chunk_second = sample_tangents(
                task, train_data, test_data, trajectory, samples[positions], removal, device
            )
            first[:, positions] = chunk_first.cpu()
            second[:, positions] = chunk_second.cpu()
            bar.update()
        bar.close()
        return SecondOrderScores(samples, removal, first, second, num_samples(train_data))


def sample_tangents(
    task: Task,
    train_data: Batch,
    test_data: Batch,
    trajectory: Trajectory,
    samples: torch.Tensor,
    removal: str,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Propagate first and second tangents for ``samples``; return ``(F'(0), F''(0))``, each ``[Q, M]``."""
    step_tangents = optimizer_tangents(trajectory.optimizer)
    samples = samples.to(device)
    first_steps = trajectory.batches.first_steps(samples.cpu()).to(device)
    shape = (len(samples), task.num_parameters)
    tangents = {order: {key: torch.zeros(shape, dtype=trajectory.dtype, device=device) for key in STATE_KEYS}
                for order in (1, 2)}

    for before, record in forward_records(task, train_data, trajectory, int(first_steps.min()) - 1, device):
        # A sample's tangents stay zero until its first batch, so only active samples are stepped.
        active = (first_steps <= record.step).nonzero().flatten()
        if len(active) == 0:
            continue
        batch_index = trajectory.batches.batch(record.step).to(device)
        first = {key: value[active] for key, value in tangents[1].items()}
        second = {key: value[active] for key, value in tangents[2].items()}
        directions = weight_directions(batch_index, samples[active], removal, trajectory.dtype)
        g1, g2 = gradient_tangents(task, select(train_data, batch_index), before["theta"],
                                   first["theta"], second["theta"], directions)
        first, second = step_tangents(before, record.gradient, record.step, trajectory.lrs[record.step - 1],
                                      first, second, g1, g2)
        for key in STATE_KEYS:
            tangents[1][key][active] = first[key]
            tangents[2][key][active] = second[key]

    final_theta = trajectory.final_parameters(device)
    return loss_path_derivatives(task, test_data, final_theta, tangents[1]["theta"], tangents[2]["theta"])
