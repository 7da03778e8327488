"""Forward tangents along a recorded run: the building blocks of the second-order method and proxy.

A tangent pair ``(x', x'')`` contains the first and second derivatives of the optimizer state
``x = (theta, m, v)`` along a path parameter e. :func:`optimizer_tangents` returns the
optimizer's step for such pairs in closed form. The step is elementwise, so whole ``[M, P]``
stacks of tangents go through it at once. The model-dependent parts (the batch gradient and
the test losses along a path) use nested ``jvp`` through :func:`second_order_jvp`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.func import jvp, vmap

from attrbench.tasks import Batch, Task, num_samples, select
from attrbench.training.optim import OptimizerSpec
from attrbench.training.trainer import StepRecord, replay
from attrbench.training.trajectory import Trajectory

STATE_KEYS = ("theta", "exp_avg", "exp_avg_sq")
Tangents = dict[str, torch.Tensor]
TangentStep = Callable[..., tuple[Tangents, Tangents]]


def optimizer_tangents(optimizer: OptimizerSpec) -> TangentStep:
    """Build the optimizer step that acts on tangents, in closed form.

    The returned function is ``step(before, gradient, step, lr, first, second, g1, g2)``:
    ``before`` is the state before the update (``theta``, ``exp_avg``, ``exp_avg_sq``, each
    ``[P]``), ``gradient`` the recorded batch gradient, ``first``/``second`` the state tangents and
    ``g1``/``g2`` the gradient tangents (``[M, P]`` each). It returns the new ``(first, second)``.

    Raises:
        ValueError: For optimizers other than AdamW, Adam and plain SGD.
    """
    hyperparameters = optimizer.hyperparameters()
    weight_decay = hyperparameters.get("weight_decay", 0.0)
    if optimizer.name in ("AdamW", "Adam"):
        betas, eps = hyperparameters["betas"], hyperparameters["eps"]

        def adamw(before, gradient, step, lr, first, second, g1, g2):
            return adamw_tangents(before, gradient, step, lr, betas, eps, weight_decay, first, second, g1, g2)

        return adamw
    if optimizer.name == "SGD":

        def sgd(before, gradient, step, lr, first, second, g1, g2):
            decay = 1.0 - lr * weight_decay
            return (
                {**first, "theta": decay * first["theta"] - lr * g1},
                {**second, "theta": decay * second["theta"] - lr * g2},
            )

        return sgd
    raise ValueError(
        f"forward tangents support runs trained with AdamW, Adam or SGD, not {optimizer.target}; "
        "drop second_order from influence.methods"
    )


def adamw_tangents(before, gradient, step, lr, betas, eps, weight_decay, first, second, g1, g2):
    """First and second tangents of one ``torch.optim.AdamW`` step (see :mod:`attrbench.influence.adamw`).

    With ``s = sqrt(c2 v)`` and ``D = s + eps`` the update is ``u = c1 m / D``; its tangents are

        u'  = c1 (m' / D - m s' / D^2)
        u'' = c1 (m'' / D - 2 m' s' / D^2 - m s'' / D^2 + 2 m s'^2 / D^3)

    with ``s' = c2 v' / (2 s)`` and ``s'' = c2 v'' / (2 s) - (c2 v')^2 / (4 s^3)``. Here ``v'`` and ``v''``
    carry v's quadratic dependence on the gradient: ``v'' = b2 v''_prev + (1 - b2)(2 g'^2 + 2 g g'')``.
    Where ``v = 0`` the square root is treated as constant (``s' = s'' = 0``), as
    :func:`~attrbench.influence.adamw.adamw_update` does.
    """
    beta1, beta2 = betas
    c1, c2 = 1.0 / (1.0 - beta1**step), 1.0 / (1.0 - beta2**step)
    exp_avg = beta1 * before["exp_avg"] + (1.0 - beta1) * gradient
    exp_avg_sq = beta2 * before["exp_avg_sq"] + (1.0 - beta2) * gradient * gradient
    m1 = beta1 * first["exp_avg"] + (1.0 - beta1) * g1
    m2 = beta1 * second["exp_avg"] + (1.0 - beta1) * g2
    v1 = beta2 * first["exp_avg_sq"] + 2.0 * (1.0 - beta2) * gradient * g1
    v2 = beta2 * second["exp_avg_sq"] + 2.0 * (1.0 - beta2) * (g1 * g1 + gradient * g2)

    positive = exp_avg_sq > 0
    root = torch.sqrt(torch.where(positive, c2 * exp_avg_sq, 1.0))
    s1 = torch.where(positive, c2 * v1 / (2.0 * root), 0.0)
    s2 = torch.where(positive, c2 * v2 / (2.0 * root) - (c2 * v1) ** 2 / (4.0 * root**3), 0.0)
    denominator = torch.where(positive, root, 0.0) + eps
    u1 = c1 * (m1 / denominator - exp_avg * s1 / denominator**2)
    u2 = c1 * (
        m2 / denominator
        - 2.0 * m1 * s1 / denominator**2
        - exp_avg * s2 / denominator**2
        + 2.0 * exp_avg * s1**2 / denominator**3
    )
    decay = 1.0 - lr * weight_decay
    new_first = {"theta": decay * first["theta"] - lr * u1, "exp_avg": m1, "exp_avg_sq": v1}
    new_second = {"theta": decay * second["theta"] - lr * u2, "exp_avg": m2, "exp_avg_sq": v2}
    return new_first, new_second


def forward_records(
    task: Task, train_data: Batch, trajectory: Trajectory, start: int = 0, device: str | torch.device = "cpu"
) -> Iterator[tuple[dict[str, torch.Tensor], StepRecord]]:
    """Yield ``(state before step t, record of step t)`` for every step after ``start``, in order.

    The state contains ``theta``, ``exp_avg`` and ``exp_avg_sq`` (zeros before AdamW's first step).
    Each segment between stored checkpoints is replayed from its own checkpoint, as in the
    reverse sweeps.
    """
    stored = trajectory.checkpoint_steps
    begin = trajectory.checkpoint_at_or_before(start)
    for segment_start, segment_stop in zip(stored[:-1], stored[1:]):
        if segment_stop <= begin:
            continue
        before = _full_state(trajectory.state(segment_start, device))
        for record in replay(task, train_data, trajectory, segment_start, segment_stop, device):
            if record.step > start:
                yield before, record
            before = _full_state(record.state_after)


def _full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    theta = state["theta"]
    return {
        "theta": theta,
        "exp_avg": state.get("exp_avg", torch.zeros_like(theta)),
        "exp_avg_sq": state.get("exp_avg_sq", torch.zeros_like(theta)),
    }


def weight_directions(batch_index: torch.Tensor, samples: torch.Tensor, removal: str, dtype) -> torch.Tensor:
    """``[M, B]`` derivative of the batch's sample weights along each sample's removal path."""
    contains = batch_index.unsqueeze(0) == samples.unsqueeze(1)
    direction = -contains.to(dtype)
    size = len(batch_index)
    if removal == "renormalize" and size >= 2:
        present = contains.any(dim=1, keepdim=True)
        others = torch.where(present, 1.0 / (size - 1), 0.0).to(dtype)
        direction = torch.where(contains, direction, others)
    return direction


def second_order_jvp(function, primals: tuple, first: tuple, second: tuple) -> tuple:
    """First and second derivatives of ``function`` along ``primals + e first + e^2 second / 2`` at e = 0.

    The second derivative is ``D2 function[first, first] + D function[second]``. Under ``vmap``
    over the tangents the primal computation stays unbatched, so it runs once for all rows.
    """

    def along_first(*points):
        return jvp(function, points, first)[1]

    first_derivative, curvature = jvp(along_first, primals, first)
    _, linear = jvp(function, primals, second)
    if isinstance(curvature, tuple):
        return first_derivative, tuple(a + b for a, b in zip(curvature, linear))
    return first_derivative, curvature + linear


def gradient_tangents(
    task: Task, batch: Batch, theta: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
    directions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tangents ``(g', g'')`` of the mean batch gradient along parameter and weight paths.

    The parameters move as ``theta + e first + e^2 second / 2`` and the sample weights as
    ``1 + e directions`` (linear, so their second tangent is zero); the denominator stays the
    batch size. Each argument's leading dimension indexes the ``M`` paths.
    """
    size = directions.shape[1]
    weights = torch.ones(size, dtype=theta.dtype, device=theta.device)

    def batch_gradient(th, w):
        return task.batch_gradient(th, batch, w, size)[0]

    def per_path(t1, t2, direction):
        return second_order_jvp(batch_gradient, (theta, weights), (t1, direction), (t2, torch.zeros_like(direction)))

    return vmap(per_path)(first, second, directions)


def loss_path_derivatives(
    task: Task, data: Batch, theta: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivatives of the per-sample losses of ``data`` along paths through ``theta``.

    Args:
        first, second: ``[M, P]``; path m is ``theta + e first[m] + e^2 second[m] / 2``.

    Returns:
        ``(F'(0), F''(0))``, each ``[Q, M]`` for the ``Q`` samples of ``data``.
    """
    firsts, seconds = [], []
    for start in range(0, num_samples(data), chunk_size):
        part = select(data, slice(start, start + chunk_size))

        def losses(th, part=part):
            return task.per_sample_loss(th, part)

        def per_path(t1, t2, losses=losses):
            return second_order_jvp(losses, (theta,), (t1,), (t2,))

        part_first, part_second = vmap(per_path)(first, second)
        firsts.append(part_first.T)
        seconds.append(part_second.T)
    return torch.cat(firsts), torch.cat(seconds)
