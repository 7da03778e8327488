"""Saving, reloading and replaying recorded trajectories."""

from __future__ import annotations

import pytest
import torch

from attrbench.influence import compute_influence
from attrbench.influence.adamw import AdamWInfluence
from attrbench.training.trainer import reverse_steps, train
from attrbench.training.trajectory import CorruptTrajectoryError, Trajectory


def _scores(task, train_data, test_data, trajectory):
    method = AdamWInfluence()
    return compute_influence(method, task, train_data, test_data, trajectory, query_chunk_size=2, progress=False)


def test_reloaded_trajectory_gives_identical_scores(tiny_problem, tmp_path):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    trajectory.save(tmp_path / "trajectory")
    reloaded = Trajectory.load(tmp_path / "trajectory")

    assert reloaded.lrs == trajectory.lrs
    assert torch.equal(reloaded.batches.indices, trajectory.batches.indices)
    in_memory = _scores(task, train_data, test_data, trajectory)
    from_disk = _scores(task, train_data, test_data, reloaded)
    assert torch.equal(in_memory.derivative, from_disk.derivative)


@pytest.mark.parametrize("every", [2, 5, 100])
def test_sparse_checkpoints_give_identical_scores(tiny_problem, tmp_path, every):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    dense = train(task, train_data, batches, lrs, optimizer, checkpoint_every=1, progress=False)
    sparse = train(task, train_data, batches, lrs, optimizer, checkpoint_every=every, progress=False)
    assert len(sparse.states) < len(dense.states)
    assert sparse.checkpoint_steps[-1] == batches.num_steps

    for record, expected in zip(reverse_steps(task, train_data, sparse), reverse_steps(task, train_data, dense)):
        assert record.step == expected.step
        assert torch.equal(record.theta_before, expected.theta_before)
        assert torch.equal(record.state_after["exp_avg_sq"], expected.state_after["exp_avg_sq"])
    assert torch.equal(_scores(task, train_data, test_data, sparse).derivative,
                       _scores(task, train_data, test_data, dense).derivative)


def test_truncated_checkpoint_is_detected(tiny_problem, tmp_path):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    trajectory.save(tmp_path / "trajectory")
    victim = tmp_path / "trajectory" / "checkpoints" / "step_000003.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CorruptTrajectoryError, match="step_000003"):
        Trajectory.load(tmp_path / "trajectory")


def test_missing_manifest_is_reported(tmp_path):
    with pytest.raises(CorruptTrajectoryError, match="manifest.json is missing"):
        Trajectory.load(tmp_path)


def test_streamed_checkpoints_equal_saved_ones(tiny_problem, tmp_path):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    in_memory = train(task, train_data, batches, lrs, optimizer, checkpoint_every=4, progress=False)
    in_memory.save(tmp_path / "saved")
    streamed = train(task, train_data, batches, lrs, optimizer, checkpoint_every=4, progress=False,
                     directory=tmp_path / "streamed")

    assert streamed.states == {}
    saved = Trajectory.load(tmp_path / "saved")
    for step in saved.checkpoint_steps:
        for key, value in saved.state(step).items():
            assert torch.equal(streamed.state(step)[key], value), (step, key)
    manifest = (tmp_path / "streamed" / "manifest.json").read_text()
    assert manifest == (tmp_path / "saved" / "manifest.json").read_text()
