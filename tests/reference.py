"""Slow, obvious references: autograd through the unrolled run with explicit sample weights."""

from __future__ import annotations

import torch

from attrbench.influence.adamw import adamw_update
from attrbench.tasks import num_samples, select


def unrolled_test_losses(task, train, test, batches, lrs, optimizer_name, hyperparameters, step_weights):
    """Train with per-step sample weights and return the final test losses (differentiable).

    Args:
        step_weights: Callable ``(step, batch_index) -> (weights [B], denominator)``.
    """
    theta = task.initial_parameters().requires_grad_(True)
    exp_avg = torch.zeros_like(theta)
    exp_avg_sq = torch.zeros_like(theta)
    for step in range(1, batches.num_steps + 1):
        batch_index = batches.batch(step)
        weights, denominator = step_weights(step, batch_index)
        losses = task.per_sample_loss(theta, select(train, batch_index))
        batch_loss = (losses * weights).sum() / denominator
        (gradient,) = torch.autograd.grad(batch_loss, theta, create_graph=True)
        lr = lrs[step - 1]
        if optimizer_name == "AdamW":
            theta, exp_avg, exp_avg_sq = adamw_update(
                theta, exp_avg, exp_avg_sq, gradient, step, lr,
                hyperparameters["betas"], hyperparameters["eps"], hyperparameters["weight_decay"],
            )
        else:
            theta = theta * (1.0 - lr * hyperparameters["weight_decay"]) - lr * gradient
    return task.per_sample_loss(theta, test)


def weight_derivatives(task, train, test, batches, lrs, optimizer_name, hyperparameters, samples):
    """``dF_q/dw_j`` for every test loss q and sample j (weights shared by all of j's steps)."""
    num_train = num_samples(train)
    weights = torch.ones(num_train, dtype=torch.float64, requires_grad=True)

    def step_weights(step, batch_index):
        return weights[batch_index], len(batch_index)

    losses = unrolled_test_losses(task, train, test, batches, lrs, optimizer_name, hyperparameters, step_weights)
    rows = [torch.autograd.grad(loss, weights, retain_graph=True)[0][samples] for loss in losses]
    return torch.stack(rows)


def renormalized_directional_derivatives(task, train, test, batches, lrs, optimizer_name, hyperparameters, samples):
    """d/d(alpha) of the test losses along the renormalized removal of each sample (alpha=0 to 1)."""
    columns = []
    for sample in samples.tolist():
        alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)

        def step_weights(step, batch_index, sample=sample, alpha=alpha):
            size = len(batch_index)
            contains = (batch_index == sample)
            if not contains.any() or size < 2:
                direction = -contains.to(torch.float64)
            else:
                # Built in float64: a float32 1/(size - 1) is off by up to 3e-8 (for size 4, say).
                others = torch.full((size,), 1.0 / (size - 1), dtype=torch.float64)
                direction = torch.where(contains, -1.0, others)
            return 1.0 + alpha * direction, size

        losses = unrolled_test_losses(task, train, test, batches, lrs, optimizer_name, hyperparameters, step_weights)
        columns.append(torch.stack([torch.autograd.grad(loss, alpha, retain_graph=True)[0] for loss in losses]))
    return torch.stack(columns, dim=1)
