"""Sharded ground truth, resumable shards and the stage cache, in process on tiny problems."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch

from attrbench.groundtruth import resume
from attrbench.groundtruth.loo import leave_one_out
from attrbench.groundtruth.resume import ShardWork, compute_shard
from attrbench.groundtruth.shards import (
    MissingShardsError, Shard, ShardIdentity, ShardMismatchError, check_sharding, merge_directory, merge_shards,
    plan_chunks, samples_key, shard_chunk_ids,
)
from attrbench.io import load_tensors
from attrbench.stages import open_stage
from attrbench.training.trainer import train

SAMPLES = torch.tensor([3, 0, 22, 11, 17, 8, 14, 5, 19])


def _identity(num_shards: int, samples: torch.Tensor, num_test: int, **changes) -> ShardIdentity:
    fields = dict(num_shards=num_shards, config_sha256="c" * 64, trajectory_sha256="t" * 64,
                  samples_sha256=samples_key(samples), num_samples=len(samples), num_test=num_test,
                  removal="keep_denominator")
    fields.update(changes)
    return ShardIdentity(**fields)


def _work(trajectory, num_shards: int, shard: int, chunk_size: int = 2, num_test: int = 4) -> ShardWork:
    chunks = plan_chunks(trajectory.batches.first_steps(SAMPLES), chunk_size)
    return ShardWork(shard, _identity(num_shards, SAMPLES, num_test), SAMPLES, chunks,
                     shard_chunk_ids(len(chunks), num_shards, shard))


@pytest.fixture
def trained(tiny_problem, tmp_path):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, checkpoint_every=3, progress=False)
    trajectory.save(tmp_path / "trajectory")
    return task, train_data, test_data, trajectory


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_merged_shards_equal_unsharded_exactly(trained, tmp_path, num_shards):
    task, train_data, test_data, trajectory = trained
    expected = leave_one_out(task, train_data, test_data, trajectory, SAMPLES, chunk_size=2, progress=False)

    shards = []
    for index in range(num_shards):
        stage = open_stage(tmp_path / "cache", "groundtruth", {"shards": num_shards, "shard": index})
        with stage.lock():
            shards.append(compute_shard(stage, _work(trajectory, num_shards, index), task, train_data, test_data,
                                        trajectory, progress=False))
    merged = merge_shards(shards)

    assert merged.delta.dtype == torch.float64
    assert torch.equal(merged.samples, SAMPLES)
    assert torch.equal(merged.delta, expected)


def test_shards_get_chunks_in_turn():
    assert shard_chunk_ids(7, 3, 0) == [0, 3, 6]
    assert shard_chunk_ids(7, 3, 1) == [1, 4]
    assert shard_chunk_ids(7, 3, 2) == [2, 5]


def test_chunk_plan_sorts_by_first_step():
    first_steps = torch.tensor([5, 1, 3, 1, 9])
    chunks = plan_chunks(first_steps, 2)
    assert [chunk.tolist() for chunk in chunks] == [[1, 3], [2, 0], [4]]


@pytest.mark.parametrize(
    "num_samples, chunk_size, num_shards, shard, message",
    [
        (10, 5, 2, 2, "groundtruth.shard=2 must be null"),
        (10, 5, 2, -1, "groundtruth.shard=-1 must be null"),
        (10, 5, 2, "all", "groundtruth.shard='all' must be null"),
        (10, 5, 0, None, "groundtruth.num_shards=0 must be an integer of at least 1"),
        (10, 5, 3, 0, "groundtruth.num_shards=3 exceeds the 2 chunks"),
        (10, 0, 1, None, "groundtruth.chunk_size=0 must be at least 1"),
    ],
)
def test_invalid_sharding_is_rejected(num_samples, chunk_size, num_shards, shard, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_sharding(num_samples, chunk_size, num_shards, shard)


def test_killed_shard_resumes_from_finished_chunks(trained, tmp_path, monkeypatch):
    task, train_data, test_data, trajectory = trained
    expected = leave_one_out(task, train_data, test_data, trajectory, SAMPLES, chunk_size=2, progress=False)
    work = _work(trajectory, 1, 0)
    stage = open_stage(tmp_path / "cache", "groundtruth", {"shard": 0})

    calls = []
    real_leave_one_out = resume.leave_one_out

    def fail_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_leave_one_out(*args, **kwargs)

    monkeypatch.setattr(resume, "leave_one_out", fail_on_third_chunk)
    with pytest.raises(KeyboardInterrupt), stage.lock():
        compute_shard(stage, work, task, train_data, test_data, trajectory, progress=False)
    progress = json.loads((stage.directory / resume.PROGRESS).read_text())
    assert sorted(progress["chunks"]) == ["0", "1"]
    assert not stage.is_complete()

    monkeypatch.setattr(resume, "leave_one_out", real_leave_one_out)
    with stage.lock():
        shard = compute_shard(stage, work, task, train_data, test_data, trajectory, progress=False)
    record = stage.record()

    assert record["attempts"] == 2
    assert record["chunks_reused"] == 2
    assert record["chunks_computed"] == len(work.chunk_ids) - 2
    for name, chunk in progress["chunks"].items():
        assert record["chunks"][name] == chunk
    assert {record["chunks"][name]["attempt"] for name in record["chunks"] if name not in progress["chunks"]} == {2}
    assert torch.equal(merge_shards([shard]).delta, expected)
    assert not (stage.directory / resume.PROGRESS).exists()
    assert not list((stage.directory / "chunks").glob("*.safetensors"))


def test_corrupt_chunk_file_is_recomputed(trained, tmp_path, monkeypatch, caplog):
    task, train_data, test_data, trajectory = trained
    expected = leave_one_out(task, train_data, test_data, trajectory, SAMPLES, chunk_size=2, progress=False)
    work = _work(trajectory, 1, 0)
    stage = open_stage(tmp_path / "cache", "groundtruth", {"shard": 0})
    real_leave_one_out = resume.leave_one_out
    calls = []

    def fail_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_leave_one_out(*args, **kwargs)

    monkeypatch.setattr(resume, "leave_one_out", fail_on_third_chunk)
    with pytest.raises(KeyboardInterrupt), stage.lock():
        compute_shard(stage, work, task, train_data, test_data, trajectory, progress=False)
    victim = stage.directory / resume.chunk_file(0)
    victim.write_bytes(victim.read_bytes()[:-7])

    monkeypatch.setattr(resume, "leave_one_out", real_leave_one_out)
    with caplog.at_level(logging.WARNING), stage.lock():
        shard = compute_shard(stage, work, task, train_data, test_data, trajectory, progress=False)

    assert "chunk_000000.safetensors is missing or does not match its SHA-256" in caplog.text
    assert stage.record()["chunks_reused"] == 1
    assert stage.record()["chunks"]["0"]["attempt"] == 2
    assert torch.equal(merge_shards([shard]).delta, expected)


def _synthetic_shards(num_shards: int, tmp_path, **changes) -> list[Shard]:
    samples = torch.arange(10, 16)
    chunks = plan_chunks(torch.zeros(len(samples), dtype=torch.long), 1)
    shards = []
    for index in range(num_shards):
        positions = torch.cat([chunks[chunk] for chunk in shard_chunk_ids(len(chunks), num_shards, index)])
        delta = torch.arange(3 * len(positions), dtype=torch.float64).reshape(3, -1) + 100 * index
        shard = Shard(index, _identity(num_shards, samples, 3, **(changes if index == num_shards - 1 else {})),
                      delta, samples[positions], positions)
        shard.path = tmp_path / f"job{index}" / f"groundtruth_shard_{index:04d}_of_{num_shards:04d}.safetensors"
        shard.save(shard.path)
        shards.append(shard)
    return shards


def test_merge_directory_assembles_positions(tmp_path):
    shards = _synthetic_shards(3, tmp_path)
    merged = merge_directory(tmp_path)
    assert torch.equal(merged.samples, torch.arange(10, 16))
    for shard in shards:
        assert torch.equal(merged.delta[:, shard.positions], shard.delta)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"trajectory_sha256": "u" * 64}, "differ in the reference trajectory"),
        ({"config_sha256": "d" * 64}, "differ in the ground-truth configuration"),
        ({"samples_sha256": "s" * 64}, "differ in the set of attributed samples"),
    ],
)
def test_merge_rejects_mismatched_shards(tmp_path, change, message):
    shards = _synthetic_shards(3, tmp_path, **change)
    with pytest.raises(ShardMismatchError, match=message) as raised:
        merge_directory(tmp_path)
    assert str(shards[-1].path) in str(raised.value)
    assert str(shards[0].path) in str(raised.value)


def test_merge_lists_missing_shards(tmp_path):
    shards = _synthetic_shards(4, tmp_path)
    shards[1].path.unlink()
    shards[3].path.unlink()
    with pytest.raises(MissingShardsError, match="missing ground-truth shards: 1, 3 of 4") as raised:
        merge_directory(tmp_path)
    assert raised.value.missing == [1, 3]


def test_merge_accepts_identical_copy_rejects_stale_one(tmp_path):
    shards = _synthetic_shards(2, tmp_path)
    copy = tmp_path / "copies" / shards[0].path.name
    copy.parent.mkdir()
    copy.write_bytes(shards[0].path.read_bytes())
    assert merge_directory(tmp_path).delta.shape == (3, 6)

    stale = Shard(0, shards[0].identity, shards[0].delta + 1, shards[0].samples, shards[0].positions)
    stale.save(copy)
    with pytest.raises(ShardMismatchError, match="shard 0 appears twice with different contents"):
        merge_directory(tmp_path)


def test_stage_lock_waits_for_holder(tmp_path):
    stage = open_stage(tmp_path, "train", {"a": 1})
    holding, release = threading.Event(), threading.Event()

    def hold():
        with stage.lock():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    with stage.lock(blocking=False) as acquired:
        assert not acquired
    threading.Timer(0.3, release.set).start()
    started = time.perf_counter()
    with stage.lock() as acquired:
        assert acquired
        assert time.perf_counter() - started >= 0.25
    holder.join(10)


def test_stage_lock_removes_interrupted_writes(tmp_path):
    stage = open_stage(tmp_path, "train", {"a": 1})
    leftover = stage.directory / "trajectory" / ".manifest.json.abc123.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("partial")
    with stage.lock():
        assert not leftover.exists()


def test_stage_detects_corrupt_output(tmp_path, caplog):
    stage = open_stage(tmp_path, "influence/sgd_influence", {"a": 1})
    with stage.lock():
        stage.begin()
        (stage.directory / "scores.bin").write_bytes(b"0123456789")
        from attrbench.io import sha256

        stage.complete({"scores.bin": sha256(stage.directory / "scores.bin")})
    assert stage.is_complete()
    (stage.directory / "scores.bin").write_bytes(b"01234")
    with caplog.at_level(logging.WARNING):
        assert not stage.is_complete()
    assert "scores.bin does not match its SHA-256" in caplog.text


def test_merge_command_takes_files_and_directories(tmp_path, capsys):
    from attrbench.merge import merge_command

    shards = _synthetic_shards(3, tmp_path / "shards")
    output = tmp_path / "merged.safetensors"

    status = merge_command([str(shards[0].path), str(shards[1].path.parent), str(shards[2].path), "-o", str(output)])

    assert status == 0
    merged = load_tensors(output)
    assert torch.equal(merged["samples"], torch.arange(10, 16))
    assert json.loads(output.with_suffix(".json").read_text())["num_shards"] == 3
    assert merge_command([str(shards[0].path)]) == 1
    assert "missing ground-truth shards: 1, 2 of 3" in capsys.readouterr().err


def test_merge_rejects_truncated_shard_file(tmp_path):
    shards = _synthetic_shards(2, tmp_path)
    shards[1].path.write_bytes(shards[1].path.read_bytes()[:20])
    with pytest.raises(ShardMismatchError, match="is not a valid safetensors file"):
        merge_directory(tmp_path)


def test_merge_rejects_overlapping_positions(tmp_path):
    shards = _synthetic_shards(2, tmp_path)
    overlapping = Shard(1, shards[1].identity, shards[1].delta, shards[1].samples, shards[0].positions)
    overlapping.save(shards[1].path)
    with pytest.raises(ShardMismatchError, match="do not cover every attributed sample exactly once"):
        merge_directory(tmp_path)
