"""Look-ahead and offline selection scores against autograd through the unrolled run, in float64."""

from __future__ import annotations

import pytest
import torch

from attrbench.influence.adamw import adamw_update
from attrbench.selection.lookahead import LookaheadScorer, renormalized_delta, sample_dots
from attrbench.selection.offline import offline_scores
from attrbench.tasks import select
from attrbench.training.optim import OptimizerSpec
from attrbench.training.trainer import train

from conftest import EXACT_RTOL, make_tiny_data, max_relative_error
from reference import renormalized_directional_derivatives


def _validation_split():
    """Validation samples drawn like the tiny training data but from another seed."""
    validation, _ = make_tiny_data(num_train=7, num_test=1, seed=5)
    return validation


def _unrolled_validation_loss(
    task, train_data, validation, batches, lrs, optimizer, state, step, end, weights
):
    """Mean validation loss after step ``end``, unrolled from ``state`` with step-``step`` weights."""
    hyperparameters = optimizer.hyperparameters()
    theta, exp_avg, exp_avg_sq = state["theta"], state.get("exp_avg"), state.get("exp_avg_sq")
    if exp_avg is None:
        exp_avg, exp_avg_sq = torch.zeros_like(theta), torch.zeros_like(theta)
    for current in range(step, end + 1):
        batch_index = batches.batch(current)
        losses = task.per_sample_loss(theta, select(train_data, batch_index))
        step_weights = weights if current == step else torch.ones_like(losses)
        batch_loss = (losses * step_weights).sum() / len(batch_index)
        (gradient,) = torch.autograd.grad(batch_loss, theta, create_graph=True)
        lr = lrs[current - 1]
        if optimizer.name == "AdamW":
            theta, exp_avg, exp_avg_sq = adamw_update(
                theta,
                exp_avg,
                exp_avg_sq,
                gradient,
                current,
                lr,
                hyperparameters["betas"],
                hyperparameters["eps"],
                hyperparameters["weight_decay"],
            )
        else:
            theta = theta * (1.0 - lr * hyperparameters["weight_decay"]) - lr * gradient
    return task.per_sample_loss(theta, validation).mean()


def _autograd_derivative(task, train_data, validation, batches, lrs, optimizer, trajectory, step, horizon):
    end = min(step + horizon, batches.num_steps)
    state = {key: value.clone() for key, value in trajectory.state(step - 1).items()}
    state["theta"].requires_grad_(True)
    weights = torch.ones(int(batches.sizes[step - 1]), dtype=torch.float64, requires_grad=True)
    loss = _unrolled_validation_loss(
        task, train_data, validation, batches, lrs, optimizer, state, step, end, weights
    )
    (derivative,) = torch.autograd.grad(loss, weights)
    return derivative


@pytest.mark.parametrize("horizon", [0, 1, 3])
def test_lookahead_equals_autograd(tiny_problem, horizon):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    validation = _validation_split()
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scorer = LookaheadScorer(task, train_data, validation, batches, lrs, optimizer)

    # Step 1 starts from an empty optimizer state, step 6 sits after warmup, and the last step
    # cuts the horizon at T.
    for step in (1, 6, batches.num_steps - 1, batches.num_steps):
        scores = scorer.score(trajectory.state(step - 1), step, horizon)
        expected = _autograd_derivative(
            task, train_data, validation, batches, lrs, optimizer, trajectory, step, horizon
        )
        assert scores.end == min(step + horizon, batches.num_steps)
        assert torch.equal(scores.batch_index, batches.batch(step))
        assert torch.isfinite(scores.derivative).all()
        if step == 1 and horizon == 0:
            # Warmup gives step 1 learning rate 0, so its own effect is exactly zero.
            assert not expected.any()
            assert not scores.derivative.any()
        else:
            assert max_relative_error(scores.derivative, expected) < EXACT_RTOL, f"step {step}"


def test_lookahead_equals_autograd_on_sgd_run(tiny_problem):
    task, train_data, _, batches, lrs, _ = tiny_problem
    optimizer = OptimizerSpec.from_config({"_target_": "torch.optim.SGD", "weight_decay": 0.01})
    lrs = [10 * lr for lr in lrs]
    validation = _validation_split()
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scorer = LookaheadScorer(task, train_data, validation, batches, lrs, optimizer)

    step, horizon = 7, 2
    scores = scorer.score(trajectory.state(step - 1), step, horizon)
    expected = _autograd_derivative(
        task, train_data, validation, batches, lrs, optimizer, trajectory, step, horizon
    )
    assert max_relative_error(scores.derivative, expected) < EXACT_RTOL


def test_score_is_renormalized_removal_effect(tiny_problem):
    """The score equals d/d(alpha) of the loss when z's weight goes to 0 and the rest to B/(B-1)."""
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    validation = _validation_split()
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scorer = LookaheadScorer(task, train_data, validation, batches, lrs, optimizer)
    step, horizon = 5, 2
    scores = scorer.score(trajectory.state(step - 1), step, horizon)

    size = int(batches.sizes[step - 1])
    for position in range(size):
        alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)
        direction = torch.full((size,), 1.0 / (size - 1), dtype=torch.float64)
        direction[position] = -1.0
        state = {key: value.clone() for key, value in trajectory.state(step - 1).items()}
        state["theta"].requires_grad_(True)
        loss = _unrolled_validation_loss(
            task,
            train_data,
            validation,
            batches,
            lrs,
            optimizer,
            state,
            step,
            step + horizon,
            1.0 + alpha * direction,
        )
        (expected,) = torch.autograd.grad(loss, alpha)
        assert float(scores.score[position]) == pytest.approx(float(expected), rel=EXACT_RTOL, abs=1e-14)


def test_sample_dots_equal_loop_of_gradients(tiny_problem):
    task, train_data, _, batches, _, _ = tiny_problem
    theta = task.initial_parameters()
    batch = select(train_data, batches.batch(2))
    directions = torch.randn(
        3, theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    dots = sample_dots(task, theta, batch, directions)

    size = len(batch["y"])
    for sample in range(size):
        single = select(batch, slice(sample, sample + 1))
        theta_leaf = theta.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(task.per_sample_loss(theta_leaf, single).sum(), theta_leaf)
        for query in range(3):
            expected = float(directions[query] @ gradient)
            assert float(dots[query, sample]) == pytest.approx(expected, rel=1e-12, abs=1e-14)

    task.micro_batch_size = 2
    assert torch.allclose(sample_dots(task, theta, batch, directions), dots, rtol=1e-13, atol=1e-15)


def test_renormalized_delta_single_sample():
    derivative = torch.tensor([[0.5]], dtype=torch.float64)
    assert torch.equal(renormalized_delta(derivative), -derivative)


def test_offline_scores_equal_autograd(tiny_problem):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    validation = _validation_split()
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scores = offline_scores(task, train_data, validation, trajectory, progress=False)

    samples = torch.tensor([0, 7, 22])
    per_validation_sample = renormalized_directional_derivatives(
        task, train_data, validation, batches, lrs, "AdamW", optimizer.hyperparameters(), samples
    )
    expected = per_validation_sample.mean(dim=0)
    assert scores.shape == (23,)
    assert max_relative_error(scores[samples], expected) < EXACT_RTOL
