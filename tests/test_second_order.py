"""Second-order influence against autograd through the unrolled run, in float64."""

from __future__ import annotations

import pytest
import torch

from attrbench.influence import compute_influence, load_scores
from attrbench.influence.adamw import AdamWInfluence
from attrbench.influence.second_order import SecondOrderInfluence
from attrbench.influence.tangents import weight_directions
from attrbench.influence.sgd import SGDInfluence
from attrbench.training.optim import OptimizerSpec
from attrbench.training.trainer import train

from conftest import EXACT_RTOL, max_relative_error
from reference import unrolled_test_losses

SAMPLES = torch.tensor([4, 0, 22, 11])


def removal_path_derivatives(task, train_data, test_data, batches, lrs, optimizer, samples, removal):
    """``(F'(0), F''(0))``, each ``[Q, M]``, by double autograd through the unrolled run."""
    firsts, seconds = [], []
    for sample in samples.tolist():
        alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)

        def step_weights(step, batch_index, sample=sample, alpha=alpha):
            direction = weight_directions(batch_index, torch.tensor([sample]), removal, torch.float64)[0]
            return 1.0 + alpha * direction, len(batch_index)

        losses = unrolled_test_losses(
            task, train_data, test_data, batches, lrs, optimizer.name, optimizer.hyperparameters(), step_weights
        )
        first_column, second_column = [], []
        for loss in losses:
            (first,) = torch.autograd.grad(loss, alpha, create_graph=True)
            (second,) = torch.autograd.grad(first, alpha, retain_graph=True)
            first_column.append(first.detach())
            second_column.append(second)
        firsts.append(torch.stack(first_column))
        seconds.append(torch.stack(second_column))
    return torch.stack(firsts, dim=1), torch.stack(seconds, dim=1)


def _second_order(task, train_data, test_data, trajectory, removal, chunk=3):
    method = SecondOrderInfluence(sample_chunk_size=chunk)
    return compute_influence(
        method, task, train_data, test_data, trajectory, samples=SAMPLES, removal=removal, progress=False
    )


@pytest.mark.parametrize("removal", ["keep_denominator", "renormalize"])
def test_second_derivative_equals_autograd(tiny_problem, removal):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, checkpoint_every=4, progress=False)
    scores = _second_order(task, train_data, test_data, trajectory, removal)

    expected_first, expected_second = removal_path_derivatives(
        task, train_data, test_data, batches, lrs, optimizer, SAMPLES, removal
    )
    assert torch.isfinite(scores.second_derivative).all()
    assert max_relative_error(scores.first_derivative, expected_first) < EXACT_RTOL
    assert max_relative_error(scores.second_derivative, expected_second) < EXACT_RTOL


def test_first_tangent_equals_adamw_influence(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scores = _second_order(task, train_data, test_data, trajectory, "keep_denominator")
    adamw = compute_influence(AdamWInfluence(), task, train_data, test_data, trajectory, progress=False)

    expected = adamw.predicted_delta("keep_denominator")[:, SAMPLES]
    assert max_relative_error(scores.first_derivative, expected) < EXACT_RTOL
    renormalized = _second_order(task, train_data, test_data, trajectory, "renormalize")
    expected = adamw.predicted_delta("renormalize")[:, SAMPLES]
    assert max_relative_error(renormalized.first_derivative, expected) < EXACT_RTOL


def test_second_derivative_on_sgd_run(tiny_problem):
    task, train_data, test_data, batches, lrs, _ = tiny_problem
    optimizer = OptimizerSpec.from_config({"_target_": "torch.optim.SGD", "weight_decay": 0.01})
    lrs = [10 * lr for lr in lrs]
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scores = _second_order(task, train_data, test_data, trajectory, "keep_denominator")
    sgd = compute_influence(SGDInfluence(), task, train_data, test_data, trajectory, progress=False)

    expected_first, expected_second = removal_path_derivatives(
        task, train_data, test_data, batches, lrs, optimizer, SAMPLES, "keep_denominator"
    )
    sgd_first_order = sgd.predicted_delta("keep_denominator")[:, SAMPLES]
    assert max_relative_error(scores.first_derivative, sgd_first_order) < EXACT_RTOL
    assert max_relative_error(scores.first_derivative, expected_first) < EXACT_RTOL
    assert max_relative_error(scores.second_derivative, expected_second) < EXACT_RTOL


def test_predicted_delta_adds_half_second_derivative(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scores = _second_order(task, train_data, test_data, trajectory, "keep_denominator")

    predicted = scores.predicted_delta("keep_denominator")
    assert predicted.shape == (4, 23)
    assert torch.equal(predicted[:, SAMPLES], scores.first_derivative + 0.5 * scores.second_derivative)
    others = torch.ones(23, dtype=torch.bool)
    others[SAMPLES] = False
    assert predicted[:, others].isnan().all()
    with pytest.raises(ValueError, match="removal='keep_denominator', not 'renormalize'"):
        scores.predicted_delta("renormalize")

    reloaded = load_scores(scores.to_tensors())
    assert reloaded.removal == "keep_denominator"
    torch.testing.assert_close(reloaded.predicted_delta("keep_denominator"), predicted, rtol=0, atol=0, equal_nan=True)


def test_second_order_needs_samples(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    with pytest.raises(ValueError, match="scores only the attributed samples"):
        compute_influence(SecondOrderInfluence(), task, train_data, test_data, trajectory, progress=False)
