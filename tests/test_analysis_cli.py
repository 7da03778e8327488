"""attrbench run +analysis=error and +analysis=system on the tiny command-line configuration."""

from __future__ import annotations

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from test_cli import TINY, run_cli


def test_error_analysis_writes_tables(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("run", *TINY, "+analysis=error", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}",
            cwd=tmp_path)

    table = pd.read_csv(run_dir / "spearman.csv")
    assert list(table.method) == ["sgd_influence", "adamw_influence", "second_order"]
    samples = pd.read_csv(run_dir / "error_samples.csv")
    summary = pd.read_csv(run_dir / "error_summary.csv")
    assert len(samples) == 12
    assert len(summary) == 1

    # The tables follow from the saved ground truth and predictions.
    delta = load_file(run_dir / "groundtruth.safetensors")["delta"]
    predictions = load_file(run_dir / "predictions.safetensors")
    first, second = predictions["adamw_influence"], predictions["second_order"]
    assert np.allclose(samples.measured_error, np.abs(delta - first).mean(axis=0), rtol=1e-6)
    assert np.allclose(samples.second_order_term, np.abs(second - first).mean(axis=0), rtol=1e-5, atol=1e-12)
    assert np.allclose(samples.second_order_residual, np.abs(delta - second).mean(axis=0), rtol=1e-6)
    assert summary.measured_error[0] == samples.measured_error.mean()
    assert np.isclose(summary.ratio_proxy[0], samples.proxy.sum() / samples.measured_error.sum())

    # attrbench report adds the error section, and attrbench figures redraws its figure.
    report = run_cli("report", str(run_dir), cwd=tmp_path)
    assert "First-order error against learning rate" in report.stdout
    error_runs = pd.read_csv(run_dir / "report" / "error_runs.csv")
    assert error_runs.measured_error[0] == summary.measured_error[0]
    figure = run_dir / "report" / "figures" / "error_vs_lr_and_steps.png"
    assert figure.is_file()
    figure.unlink()
    run_cli("figures", str(run_dir), cwd=tmp_path)
    assert figure.is_file()


def test_system_study_writes_table(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("run", *TINY, "+analysis=system", "analysis.checkpoint_every=[2]", f"hydra.run.dir={run_dir}",
            f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)

    table = pd.read_csv(run_dir / "system.csv").set_index("variant")
    assert table.loc["float64 ground truth, identical rerun", "groundtruth_max_abs_change"] == 0.0
    assert table.loc["float64 training rerun, final parameters", "groundtruth_max_abs_change"] == 0.0
    assert table.loc["every 2 steps, exact recomputation", "score_max_relative_change"] == 0.0
    assert table.loc["checkpoints stored in float32", "score_max_relative_change"] > 0.0
    assert set(table.study) == {"reference", "precision", "storage", "checkpoints", "noise floor"}


def test_system_study_needs_float64(tmp_path):
    result = run_cli("run", *TINY, "+analysis=system", "dtype=float32", f"hydra.run.dir={tmp_path / 'run'}",
                     f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "run it with dtype=float64" in result.stderr
