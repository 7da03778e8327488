"""The closed-form error proxy: the second-order remainder under frozen gradients.

The derivation, its assumptions and its learning-rate and trajectory-length factors are in
docs/error_proxy.md. In short, for each attributed sample j and test loss F_q the proxy is

    E_qj = optimizer term + curvature term
         = F''_frozen / 2 + Lambda_j grad F_q(theta_T) . c_j / 2

* ``F''_frozen`` is the second derivative of F_q along ``theta_T + e theta'_j + e^2 theta''_j / 2``.
  Here ``theta'_j, theta''_j`` are the first and second tangents of a *frozen-gradient* run. That
  run takes the recorded batch gradients plus only the sample's direct gradient perturbation,
  and later gradients do not respond to the parameter change. Under that assumption AdamW's update
  is elementwise, so the tangents follow from elementwise recursions along the stored states
  (learning rates, bias corrections, m, v), exactly including v's quadratic dependence on the
  gradient perturbation. The final derivative adds the test loss's own curvature along
  ``theta'_j``.
* ``c_j = grad^3 L[theta'_j, theta'_j]`` is the training loss's third derivative acting on the
  first-order perturbation, probed once at the final parameters on a fixed subset of the
  training data. ``Lambda_j`` is the median over coordinates of ``sum_{t > t_j} d theta_T / d g_t``,
  the frozen run's response to a unit gradient change at every step after the sample's first
  step: roughly the learning rate times the number of remaining steps over the preconditioner
  ``sqrt(v_hat) + eps``.

The sample's first-order frozen perturbation ``theta'_j`` and ``Lambda_j`` are reported too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.func import vmap
from tqdm.auto import tqdm

from attrbench.groundtruth.loo import check_removal
from attrbench.influence.tangents import (
    STATE_KEYS,
    forward_records,
    loss_path_derivatives,
    optimizer_tangents,
    second_order_jvp,
)
from attrbench.tasks import Batch, Task, num_samples, select
from attrbench.training.trajectory import Trajectory

log = logging.getLogger(__name__)


@dataclass
class ProxyTerms:
    """The proxy's parts for every test loss and attributed sample.

    Attributes:
        samples: ``[M]`` training-sample indices the columns refer to.
        optimizer_term: ``[Q, M]`` half the frozen-gradient second derivative (AdamW's nonlinear
            dependence on the gradient plus the test loss's curvature).
        curvature_term: ``[Q, M]`` half the training loss's third-derivative contribution.
        perturbation_size: ``[M]`` Euclidean norm of the frozen first-order perturbation
            ``theta'_j`` at the last step.
        lr_length: ``[M]`` ``|Lambda_j|``, the median over coordinates of the preconditioned
            learning rate summed over the steps after the sample's first step. The median ignores
            the rare coordinates with tiny ``v``, where the preconditioner approaches ``1 / eps``.
    """

    samples: torch.Tensor
    optimizer_term: torch.Tensor
    curvature_term: torch.Tensor
    perturbation_size: torch.Tensor
    lr_length: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """``[Q, M]`` the proxy's prediction of the second-order term ``F''(0) / 2``."""
        return self.optimizer_term + self.curvature_term

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "samples": self.samples,
            "optimizer_term": self.optimizer_term,
            "curvature_term": self.curvature_term,
            "perturbation_size": self.perturbation_size,
            "lr_length": self.lr_length,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ProxyTerms:
        return cls(**{key: tensors[key] for key in
                      ("samples", "optimizer_term", "curvature_term", "perturbation_size", "lr_length")})


def error_proxy(
    task: Task,
    train_data: Batch,
    test_data: Batch,
    trajectory: Trajectory,
    samples: torch.Tensor,
    removal: str = "keep_denominator",
    curvature_batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ProxyTerms:
    """Evaluate the proxy for ``samples`` along the recorded run (no retraining, no model tangents).

    Args:
        removal: ``keep_denominator`` or ``renormalize``; sets the gradient perturbation of the
            sample's batches.
        curvature_batch_size: Training samples (drawn with ``seed``) on which the loss's third
            derivative is probed at the final parameters.

    Raises:
        ValueError: For an unknown removal or a non-positive ``curvature_batch_size``.
    """
    check_removal(removal)
    if curvature_batch_size < 1:
        raise ValueError(f"curvature_batch_size={curvature_batch_size} must be at least 1")
    samples = torch.as_tensor(samples, dtype=torch.long).to(device)
    tangents, response = frozen_tangents(task, train_data, trajectory, samples, removal, device, progress)

    final_theta = trajectory.final_parameters(device)
    _, frozen_second = loss_path_derivatives(task, test_data, final_theta, tangents[1], tangents[2])
    generator = torch.Generator().manual_seed(seed)
    size = min(curvature_batch_size, num_samples(train_data))
    probe_batch = select(train_data, torch.randperm(num_samples(train_data), generator=generator)[:size].to(device))
    third = third_derivative(task, probe_batch, final_theta, tangents[1])
    # A typical coordinate's response, not the elementwise one: in coordinates whose v is tiny the
    # frozen response grows like 1/eps, which the real run's curvature feedback prevents.
    # NOTE: without that feedback Lambda grows like lr * (T - t_j) without bound, so this term
    # overshoots by orders of magnitude once lr * (T - t_j) is large (MNIST MLP at lr 1e-2).
    typical_response = response.median(dim=1).values.unsqueeze(1)
    curvature_first, _ = loss_path_derivatives(
        task, test_data, final_theta, typical_response * third, torch.zeros_like(third)
    )

    return ProxyTerms(
        samples=samples.cpu(),
        optimizer_term=0.5 * frozen_second.cpu(),
        curvature_term=0.5 * curvature_first.cpu(),
        perturbation_size=tangents[1].norm(dim=1).cpu(),
        lr_length=typical_response.squeeze(1).abs().cpu(),
    )


def frozen_tangents(
    task: Task,
    train_data: Batch,
    trajectory: Trajectory,
    samples: torch.Tensor,
    removal: str,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Parameter tangents of the frozen-gradient run and its response to later gradient changes.

    Returns:
        ``({1: theta'_T, 2: theta''_T}, Lambda)``, each ``[M, P]``. ``Lambda`` is the first-order
        change of ``theta_T`` when every batch gradient after the sample's first step grows by
        one in every coordinate.
    """
    step_tangents = optimizer_tangents(trajectory.optimizer)
    first_steps = trajectory.batches.first_steps(samples.cpu()).to(device)
    shape = (len(samples), task.num_parameters)
    tangents = {order: {key: torch.zeros(shape, dtype=trajectory.dtype, device=device) for key in STATE_KEYS}
                for order in (1, 2, "response")}
    start = int(first_steps.min()) - 1
    records = forward_records(task, train_data, trajectory, start, device)

    for before, record in tqdm(records, total=trajectory.num_steps - start, desc="error proxy",
                               disable=not progress, leave=False):
        active = (first_steps <= record.step).nonzero().flatten()
        if len(active) == 0:
            continue
        perturbation = gradient_perturbation(task, train_data, trajectory, record, samples[active], removal)
        lr = trajectory.lrs[record.step - 1]
        first, second = step_tangents(
            before, record.gradient, record.step, lr,
            {key: value[active] for key, value in tangents[1].items()},
            {key: value[active] for key, value in tangents[2].items()},
            perturbation, torch.zeros_like(perturbation),
        )
        # Lambda: a unit change of every later gradient coordinate, propagated to first order.
        unit = (first_steps[active] < record.step).to(trajectory.dtype).unsqueeze(1).expand_as(perturbation)
        response, _ = step_tangents(
            before, record.gradient, record.step, lr,
            {key: value[active] for key, value in tangents["response"].items()},
            {key: torch.zeros_like(perturbation) for key in STATE_KEYS}, unit, torch.zeros_like(perturbation),
        )
        for key in STATE_KEYS:
            tangents[1][key][active] = first[key]
            tangents[2][key][active] = second[key]
            tangents["response"][key][active] = response[key]
    return {1: tangents[1]["theta"], 2: tangents[2]["theta"]}, tangents["response"]["theta"]


def gradient_perturbation(task, train_data, trajectory, record, samples, removal) -> torch.Tensor:
    """``[M, P]`` derivative of step ``record.step``'s batch gradient along each sample's removal path."""
    batch_index = trajectory.batches.batch(record.step).to(samples.device)
    size = len(batch_index)
    perturbation = torch.zeros(len(samples), task.num_parameters, dtype=trajectory.dtype, device=samples.device)
    present = torch.isin(samples, batch_index)
    if not present.any():
        return perturbation
    own = task.sample_gradients(record.theta_before, select(train_data, samples[present]))
    if removal == "renormalize" and size >= 2:
        # Weights -1 on the sample and 1/(|B|-1) on the others, over |B|: (g - grad l_j) / (|B| - 1).
        perturbation[present] = (record.gradient - own) / (size - 1)
    else:
        perturbation[present] = -own / size
    return perturbation


def third_derivative(task: Task, batch: Batch, theta: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``[M, P]`` ``grad^3 L[u, u]`` of the batch's mean loss at ``theta`` for each direction ``u``."""
    size = num_samples(batch)
    weights = torch.ones(size, dtype=theta.dtype, device=theta.device)

    def gradient(th):
        return task.batch_gradient(th, batch, weights, size)[0]

    def per_direction(direction):
        return second_order_jvp(gradient, (theta,), (direction,), (torch.zeros_like(direction),))[1]

    return vmap(per_direction)(directions)
