"""AdamW- and SGD-influence against autograd through the unrolled run, in float64."""

from __future__ import annotations

import torch

from attrbench.influence import compute_influence
from attrbench.influence.adamw import AdamWInfluence
from attrbench.influence.sgd import SGDInfluence
from attrbench.training.optim import OptimizerSpec
from attrbench.training.trainer import train

from conftest import EXACT_RTOL, max_relative_error
from reference import renormalized_directional_derivatives, weight_derivatives

SAMPLES = torch.arange(23)


def _scores(method, task, train_data, test_data, trajectory):
    return compute_influence(method, task, train_data, test_data, trajectory, query_chunk_size=3, progress=False)


def test_adamw_influence_equals_autograd(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scores = _scores(AdamWInfluence(), task, train_data, test_data, trajectory)

    expected = weight_derivatives(
        task, train_data, test_data, batches, lrs, "AdamW", optimizer.hyperparameters(), SAMPLES
    )
    assert torch.isfinite(scores.derivative).all()
    assert max_relative_error(scores.derivative, expected) < EXACT_RTOL


def test_adamw_influence_dead_feature_is_finite(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    final = trajectory.state(trajectory.num_steps)
    # The first layer's weights on the always-zero input never receive a gradient.
    assert (final["exp_avg_sq"] == 0).any()
    scores = _scores(AdamWInfluence(), task, train_data, test_data, trajectory)
    assert torch.isfinite(scores.derivative).all()


def test_adamw_influence_renormalize_equals_autograd(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scores = _scores(AdamWInfluence(), task, train_data, test_data, trajectory)
    samples = torch.tensor([0, 7, 22])

    expected = renormalized_directional_derivatives(
        task, train_data, test_data, batches, lrs, "AdamW", optimizer.hyperparameters(), samples
    )
    predicted = scores.predicted_delta("renormalize")[:, samples]
    assert max_relative_error(predicted, expected) < EXACT_RTOL


def test_sgd_influence_equals_autograd_on_sgd_run(tiny_problem):
    task, train_data, test_data, batches, lrs, _ = tiny_problem
    optimizer = OptimizerSpec.from_config({"_target_": "torch.optim.SGD", "weight_decay": 0.01})
    lrs = [10 * lr for lr in lrs]
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scores = _scores(SGDInfluence(), task, train_data, test_data, trajectory)

    expected = weight_derivatives(
        task, train_data, test_data, batches, lrs, "SGD", optimizer.hyperparameters(), SAMPLES
    )
    assert max_relative_error(scores.derivative, expected) < EXACT_RTOL


def test_finite_difference_agrees_with_both(tiny_problem):
    """A central difference in one sample's weight matches both derivatives."""
    task, train_data, test_data, batches, lrs, adamw = tiny_problem
    sample, step_size = 4, 1e-5
    for optimizer, method, scale in (
        (adamw, AdamWInfluence(), 1.0),
        (OptimizerSpec.from_config({"_target_": "torch.optim.SGD"}), SGDInfluence(), 10.0),
    ):
        run_lrs = [scale * lr for lr in lrs]
        trajectory = train(task, train_data, batches, run_lrs, optimizer, progress=False)
        derivative = _scores(method, task, train_data, test_data, trajectory).derivative[:, sample]

        def test_losses(weight):
            weights = torch.ones(23, dtype=torch.float64)
            weights[sample] = weight
            return _weighted_run(task, train_data, test_data, batches, run_lrs, optimizer, weights)

        central = (test_losses(1 + step_size) - test_losses(1 - step_size)) / (2 * step_size)
        assert max_relative_error(derivative, central) < 1e-5


def _weighted_run(task, train_data, test_data, batches, lrs, optimizer, weights):
    """Train with the real torch optimizer and fixed sample weights; return test losses."""
    from attrbench.tasks import select
    from attrbench.training.optim import optimizer_step

    theta = task.initial_parameters().requires_grad_(True)
    torch_optimizer = optimizer.build(theta, lr=0.0)
    for step in range(1, batches.num_steps + 1):
        index = batches.batch(step)
        gradient, _ = task.batch_gradient(theta.detach(), select(train_data, index), weights[index], len(index))
        optimizer_step(torch_optimizer, theta, gradient, lrs[step - 1])
    return task.evaluate_losses(theta.detach(), test_data)
