"""AdamW-influence on tiny GPT-2 and Llama models against autograd through the unrolled run.

Both problems run in float64 with AdamW (weight decay on) for two epochs. The warmup-then-linear
learning-rate schedule gives the first update learning rate 0. The Llama data are right-padded
instruction pairs whose prompt tokens are masked out of the loss.
"""

from __future__ import annotations

import pytest
import torch

from attrbench.groundtruth.loo import leave_one_out
from attrbench.influence import compute_influence
from attrbench.influence.adamw import AdamWInfluence
from attrbench.tasks import num_samples
from attrbench.training.optim import OptimizerSpec
from attrbench.training.schedule import BatchSchedule, learning_rates
from attrbench.training.trainer import train

from conftest import EXACT_RTOL, max_relative_error
from lm_problems import tiny_gpt2_problem, tiny_llama_problem
from reference import renormalized_directional_derivatives, weight_derivatives
from test_groundtruth import _retrain_one

PROBLEMS = {"gpt2": tiny_gpt2_problem, "llama": tiny_llama_problem}
ADAMW = {"_target_": "torch.optim.AdamW", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


@pytest.fixture(scope="module", params=sorted(PROBLEMS))
def recorded_run(request):
    task, train_data, test_data = PROBLEMS[request.param]()
    batches = BatchSchedule.shuffled(num_samples(train_data), batch_size=4, epochs=2, seed=3)
    lrs = learning_rates("linear", 0.02, batches.num_steps, warmup_ratio=0.2)
    optimizer = OptimizerSpec.from_config(ADAMW)
    trajectory = train(task, train_data, batches, lrs, optimizer, checkpoint_every=2, progress=False)
    return task, train_data, test_data, batches, lrs, optimizer, trajectory


def test_adamw_influence_equals_autograd(recorded_run):
    task, train_data, test_data, batches, lrs, optimizer, trajectory = recorded_run
    scores = compute_influence(AdamWInfluence(), task, train_data, test_data, trajectory,
                               query_chunk_size=2, progress=False)
    samples = torch.arange(num_samples(train_data))
    expected = weight_derivatives(task, train_data, test_data, batches, lrs, "AdamW",
                                  optimizer.hyperparameters(), samples)
    assert lrs[0] == 0.0
    assert expected.abs().max() > 0
    assert max_relative_error(scores.derivative, expected) < EXACT_RTOL


def test_adamw_influence_renormalize_equals_autograd(recorded_run):
    task, train_data, test_data, batches, lrs, optimizer, trajectory = recorded_run
    scores = compute_influence(AdamWInfluence(), task, train_data, test_data, trajectory,
                               query_chunk_size=3, progress=False)
    samples = torch.tensor([0, 5])
    expected = renormalized_directional_derivatives(task, train_data, test_data, batches, lrs, "AdamW",
                                                    optimizer.hyperparameters(), samples)
    predicted = scores.predicted_delta("renormalize")[:, samples]
    assert max_relative_error(predicted, expected) < EXACT_RTOL


def test_leave_one_out_equals_retraining(recorded_run):
    task, train_data, test_data, batches, lrs, optimizer, trajectory = recorded_run
    samples = torch.tensor([4, 1, 7])
    delta = leave_one_out(task, train_data, test_data, trajectory, samples, "keep_denominator",
                          chunk_size=2, progress=False)
    reference = task.evaluate_losses(trajectory.final_parameters(), test_data)
    for column, sample in enumerate(samples.tolist()):
        expected = _retrain_one(task, train_data, test_data, batches, lrs, optimizer, sample,
                                "keep_denominator") - reference
        assert torch.allclose(delta[:, column], expected, rtol=1e-9, atol=1e-13), sample
