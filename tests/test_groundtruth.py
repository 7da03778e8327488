"""Batched leave-one-out retraining against a plain loop of single retrains."""

from __future__ import annotations

import pytest
import torch

from attrbench.groundtruth.loo import leave_one_out
from attrbench.tasks import select
from attrbench.training.optim import optimizer_step
from attrbench.training.trainer import train


def _retrain_one(task, train_data, test_data, batches, lrs, optimizer, removed, removal):
    """Train from scratch without ``removed`` (one model, plain Python loop)."""
    theta = task.initial_parameters().requires_grad_(True)
    torch_optimizer = optimizer.build(theta, lr=0.0)
    for step in range(1, batches.num_steps + 1):
        index = batches.batch(step)
        weights = (index != removed).to(theta.dtype)
        denominator = len(index) if removal == "keep_denominator" else max(float(weights.sum()), 1.0)
        gradient, _ = task.batch_gradient(theta.detach(), select(train_data, index), weights, denominator)
        optimizer_step(torch_optimizer, theta, gradient, lrs[step - 1])
    return task.evaluate_losses(theta.detach(), test_data)


@pytest.mark.parametrize("removal", ["keep_denominator", "renormalize"])
@pytest.mark.parametrize("checkpoint_every", [1, 4])
def test_batched_loo_equals_loop(tiny_problem, removal, checkpoint_every):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, checkpoint_every=checkpoint_every, progress=False)
    samples = torch.tensor([3, 0, 22, 11, 17])

    delta = leave_one_out(task, train_data, test_data, trajectory, samples, removal, chunk_size=2, progress=False)

    reference = task.evaluate_losses(trajectory.final_parameters(), test_data)
    for column, sample in enumerate(samples.tolist()):
        expected = _retrain_one(task, train_data, test_data, batches, lrs, optimizer, sample, removal) - reference
        assert torch.allclose(delta[:, column], expected, rtol=1e-9, atol=1e-13), sample


def test_removal_semantics_differ(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    samples = torch.tensor([5])
    keep = leave_one_out(task, train_data, test_data, trajectory, samples, "keep_denominator", progress=False)
    renormalize = leave_one_out(task, train_data, test_data, trajectory, samples, "renormalize", progress=False)
    assert not torch.allclose(keep, renormalize)


def test_unknown_removal_rejected(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    with pytest.raises(ValueError, match="groundtruth.removal='drop'"):
        leave_one_out(task, train_data, test_data, trajectory, torch.tensor([0]), "drop", progress=False)
