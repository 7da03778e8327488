"""The system-level study's building blocks on the tiny problem."""

from __future__ import annotations

import torch

from attrbench.analysis.system import (
    cast_trajectory,
    max_relative_change,
    nearest_state_trajectory,
    noise_floor,
    sparse_trajectory,
)
from attrbench.influence import compute_influence
from attrbench.influence.adamw import AdamWInfluence
from attrbench.training.trainer import reverse_steps, train

SAMPLES = torch.tensor([3, 0, 22, 11, 17])


def _scores(task, train_data, test_data, trajectory):
    return compute_influence(AdamWInfluence(), task, train_data, test_data, trajectory, progress=False).derivative


def test_noise_floor_float64_reruns_agree_exactly(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, checkpoint_every=4, progress=False)

    identical, rechunked = noise_floor(task, train_data, test_data, trajectory, SAMPLES, "keep_denominator",
                                       chunk_size=2, alternative_chunk_size=5)
    assert identical["variant"] == "float64 ground truth, identical rerun"
    assert identical["groundtruth_max_abs_change"] == 0.0
    assert rechunked["variant"] == "float64 ground truth, rerun with 5 counterfactuals per stack"
    # Other stacks change only the rounding of the batched kernels.
    assert rechunked["groundtruth_change_over_max_effect"] < 1e-10


def test_sparse_trajectory_recomputes_exactly(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    sparse = sparse_trajectory(trajectory, 4)
    assert sparse.checkpoint_steps == [0, 4, 8, 12, 15]
    assert torch.equal(_scores(task, train_data, test_data, sparse), _scores(task, train_data, test_data, trajectory))


def test_nearest_state_trajectory_reuses_stored_states(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    approximate = nearest_state_trajectory(trajectory, 4)

    # Step 6 is nearest to 4 (a tie between 4 and 8 goes to the earlier), step 7 to 8.
    assert torch.equal(approximate.state(6)["theta"], trajectory.state(4)["theta"])
    assert torch.equal(approximate.state(7)["exp_avg_sq"], trajectory.state(8)["exp_avg_sq"])
    assert float(approximate.state(7)["step"]) == 7.0
    # Step 1 is nearest to the initialization, which has no optimizer state yet.
    assert torch.equal(approximate.state(1)["exp_avg"], torch.zeros_like(trajectory.state(1)["exp_avg"]))
    records = {record.step: record for record in reverse_steps(task, train_data, approximate)}
    assert torch.equal(records[7].theta_before, trajectory.state(4)["theta"])

    scores = _scores(task, train_data, test_data, approximate)
    exact = _scores(task, train_data, test_data, trajectory)
    assert torch.isfinite(scores).all()
    assert 0.0 < max_relative_change(scores, exact)
    assert torch.equal(_scores(task, train_data, test_data, nearest_state_trajectory(trajectory, 1)), exact)


def test_cast_trajectory_reads_in_float32(tiny_problem):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    single = cast_trajectory(trajectory, torch.float32)
    assert single.state(3)["theta"].dtype == torch.float32
    assert trajectory.state(3)["theta"].dtype == torch.float64
