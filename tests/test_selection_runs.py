"""Online and offline selection end to end on the tiny problem."""

from __future__ import annotations

import pytest
import torch

from attrbench.data import DataSplits
from attrbench.selection.data import split_validation
from attrbench.selection.lookahead import LookaheadScorer
from attrbench.selection.offline import schedule_without, train_offline
from attrbench.selection.online import drop_count, train_online
from attrbench.training.schedule import BatchSchedule
from attrbench.training.trainer import train

from conftest import make_tiny_data

FRACTION = 0.4


def _validation_split():
    validation, _ = make_tiny_data(num_train=7, num_test=1, seed=5)
    return validation


def _check_partition(run):
    """Every step's batch splits into the kept row and the dropped positions, nothing else."""
    assert run.kept.num_steps == run.batches.num_steps
    for step in range(1, run.batches.num_steps + 1):
        batch = run.batches.batch(step)
        kept = run.kept.batch(step)
        dropped = batch[run.dropped[step - 1, : len(batch)]]
        assert len(dropped) == drop_count(len(batch), FRACTION), f"step {step}"
        assert not torch.isin(kept, dropped).any(), f"step {step}"
        assert torch.equal(kept, batch[~torch.isin(batch, dropped)]), f"step {step}"


@pytest.mark.parametrize("horizon", [0, 2])
def test_online_lookahead_drops_lowest_scores(tiny_problem, horizon):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    validation = _validation_split()
    run = train_online(
        task, train_data, validation, batches, lrs, optimizer, "lookahead", FRACTION, horizon, progress=False
    )

    _check_partition(run)
    for step in range(1, batches.num_steps + 1):
        size = int(batches.sizes[step - 1])
        scores, dropped = run.step_scores[step - 1, :size], run.dropped[step - 1, :size]
        assert torch.isfinite(scores).all()
        assert scores[dropped].max() <= scores[~dropped].min(), f"step {step}"

    # Retraining on the kept batches alone reproduces the selection run bit for bit.
    retrained = train(task, train_data, run.kept, run.lrs, optimizer, progress=False)
    assert torch.equal(retrained.final_parameters(), run.theta)

    # Each step was scored from the run's own state before that step.
    scorer = LookaheadScorer(task, train_data, validation, batches, lrs, optimizer)
    for step in (1, 8, batches.num_steps):
        size = int(batches.sizes[step - 1])
        expected = scorer.score(retrained.state(step - 1), step, horizon).score
        assert torch.equal(run.step_scores[step - 1, :size], expected), f"step {step}"


def test_online_horizons_choose_differently(tiny_problem):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    validation = _validation_split()
    runs = [
        train_online(
            task,
            train_data,
            validation,
            batches,
            lrs,
            optimizer,
            "lookahead",
            FRACTION,
            horizon,
            progress=False,
        )
        for horizon in (0, 2)
    ]
    assert not torch.equal(runs[0].dropped, runs[1].dropped)


def test_online_random_is_seeded(tiny_problem):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    validation = _validation_split()
    first, second, other = (
        train_online(
            task,
            train_data,
            validation,
            batches,
            lrs,
            optimizer,
            "random",
            FRACTION,
            seed=seed,
            progress=False,
        )
        for seed in (3, 3, 4)
    )
    _check_partition(first)
    assert first.step_scores is None
    assert torch.equal(first.dropped, second.dropped)
    assert torch.equal(first.theta, second.theta)
    assert not torch.equal(first.dropped, other.dropped)
    retrained = train(task, train_data, first.kept, first.lrs, optimizer, progress=False)
    assert torch.equal(retrained.final_parameters(), first.theta)


def test_offline_drops_lowest_and_retrains_without_them(tiny_problem):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    validation = _validation_split()
    reference = train(task, train_data, batches, lrs, optimizer, progress=False)
    run = train_offline(task, train_data, validation, reference, 0.3, progress=False)

    scores = run.sample_scores
    dropped_samples = torch.unique(batches.indices[run.dropped])
    assert len(dropped_samples) == drop_count(23, 0.3) == 7
    is_dropped = torch.zeros(23, dtype=torch.bool)
    is_dropped[dropped_samples] = True
    assert scores[is_dropped].max() <= scores[~is_dropped].min()

    # The retrained schedule is the reference schedule with exactly the dropped samples removed.
    for step in range(1, batches.num_steps + 1):
        batch = batches.batch(step)
        assert torch.equal(run.kept.batch(step), batch[~is_dropped[batch]]), f"step {step}"
        assert torch.equal(run.dropped[step - 1, : len(batch)], is_dropped[batch]), f"step {step}"
    retrained = train(task, train_data, run.kept, run.lrs, optimizer, progress=False)
    assert torch.equal(retrained.final_parameters(), run.theta)
    assert not torch.equal(run.theta, reference.final_parameters())


def test_schedule_without_skips_emptied_steps():
    batches = BatchSchedule.from_batches([torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3, 4, 5])])
    kept, lrs, steps = schedule_without(batches, [0.1, 0.2, 0.3], torch.tensor([2, 4]))
    assert kept.num_steps == 2
    assert kept.batch(1).tolist() == [0, 1]
    assert kept.batch(2).tolist() == [3, 5]
    assert lrs == [0.1, 0.3]
    assert steps == [1, 3]


@pytest.mark.parametrize(
    "size, fraction, expected",
    [(64, 0.1, 6), (64, 0.25, 16), (5, 0.4, 2), (3, 0.5, 2), (1, 0.5, 0), (20, 0.0, 0)],
)
def test_drop_count(size, fraction, expected):
    assert drop_count(size, fraction) == expected


@pytest.mark.parametrize(
    "options, message",
    [
        ({"policy": "greedy"}, "online policy 'greedy' is not one of lookahead, random"),
        ({"fraction": 1.0}, "selection.fraction=1.0 must lie in [0, 1)"),
        ({"fraction": -0.1}, "selection.fraction=-0.1 must lie in [0, 1)"),
        ({"horizon": -1}, "selection.horizon=-1 must be at least 0"),
    ],
)
def test_online_rejects_invalid_options(tiny_problem, options, message):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    arguments = {"policy": "lookahead", "fraction": FRACTION, "horizon": 1, **options}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        train_online(
            task, train_data, _validation_split(), batches, lrs, optimizer, progress=False, **arguments
        )


def test_validation_split_is_disjoint_from_train():
    train_data, test_data = make_tiny_data()
    train_data["id"] = torch.arange(23)
    test_data["id"] = torch.arange(23, 27)
    data = split_validation(DataSplits(train_data, test_data, "tiny"), num_validation=5, seed=0)
    assert len(data.validation["id"]) == 5
    assert data.num_train == 18
    everything = torch.cat([data.train["id"], data.validation["id"], data.test["id"]])
    assert len(torch.unique(everything)) == 27
    assert torch.equal(data.validation["id"], data.validation_index)


@pytest.mark.parametrize("size", [0, 22])
def test_validation_split_rejects_sizes(size):
    train_data, test_data = make_tiny_data()
    with pytest.raises(ValueError, match=f"selection.num_validation={size} must lie between 1 and 21"):
        split_validation(DataSplits(train_data, test_data, "tiny"), num_validation=size, seed=0)
