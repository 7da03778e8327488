"""Selection table, best horizon and figures from hand-written selection.json files."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from attrbench.app import CONFIG_DIR
from attrbench.experiment import ConfigError
from attrbench.io import write_json
from attrbench.selection.report import (
    best_horizons,
    collect_results,
    failed_jobs,
    main,
    plot_best_horizon,
    plot_loss_vs_horizon,
    selection_table,
    write_selection_report,
)
from attrbench.selection.runner import validate_selection

# (method, horizon, lr) -> test loss of seeds 0, 1, 2
LOSSES = {
    ("none", None, 1e-3): [0.50, 0.52, 0.54],
    ("random", None, 1e-3): [0.56, 0.55, 0.57],
    ("lookahead", 0, 1e-3): [0.49, 0.50, 0.48],
    ("lookahead", 4, 1e-3): [0.47, 0.46, 0.48],
    ("offline", None, 1e-3): [0.51, 0.50, 0.52],
    ("none", None, 1e-4): [0.90, 0.91, 0.92],
    ("lookahead", 0, 1e-4): [0.95, 0.94, 0.93],
    ("lookahead", 4, 1e-4): [0.92, 0.93, 0.94],
    ("offline", None, 1e-4): [0.89, 0.90, 0.88],
}


def _write_runs(root):
    for (method, horizon, lr), losses in LOSSES.items():
        for seed, loss in enumerate(losses):
            directory = root / f"{method}_{horizon}_{lr}_{seed}"
            write_json(
                directory / "selection.json",
                {
                    "setting": "mnist_mlp",
                    "method": method,
                    "horizon": horizon,
                    "fraction": 0.2,
                    "lr": lr,
                    "seed": seed,
                    "epochs": 1,
                    "num_steps": 50,
                    "test_loss": loss,
                    "test_accuracy": 1.0 - loss,
                    "validation_loss": loss + 0.01,
                    "selection_seconds": 1.0,
                },
            )


def test_table_means_and_deviations(tmp_path):
    _write_runs(tmp_path)
    table = selection_table(collect_results(tmp_path))
    assert len(table) == len(LOSSES)
    assert table[table.lr == 1e-3].label.tolist() == ["none", "random", "K=0", "K=4", "offline"]
    for (method, horizon, lr), losses in LOSSES.items():
        row = table[(table.method == method) & (table.lr == lr)]
        if horizon is not None:
            row = row[row.horizon == horizon]
        assert len(row) == 1
        mean = sum(losses) / 3
        deviation = math.sqrt(sum((loss - mean) ** 2 for loss in losses) / 2)
        assert row.test_loss_mean.iloc[0] == pytest.approx(mean, rel=1e-12)
        assert row.test_loss_std.iloc[0] == pytest.approx(deviation, rel=1e-12)
        assert row.test_accuracy_mean.iloc[0] == pytest.approx(1.0 - mean, rel=1e-12)
        assert row.seeds.iloc[0] == 3


def test_best_horizon_counts_offline_as_full_run(tmp_path):
    _write_runs(tmp_path)
    best = best_horizons(selection_table(collect_results(tmp_path))).set_index("lr")
    assert best.loc[1e-3, "best"] == "K=4"
    assert best.loc[1e-3, "best_horizon"] == 4
    assert best.loc[1e-4, "best"] == "offline"
    assert best.loc[1e-4, "best_horizon"] == 50
    assert best.loc[1e-4, "best_lookahead"] == "K=4"
    assert best.loc[1e-3, "random_test_loss"] == pytest.approx(0.56)
    assert math.isnan(best.loc[1e-4, "random_test_loss"])


def test_repeated_run_is_counted_once(tmp_path):
    _write_runs(tmp_path)
    write_json(
        tmp_path / "zz_rerun" / "selection.json",
        {
            **pd.read_json(tmp_path / "none_None_0.001_0" / "selection.json", typ="series").to_dict(),
            "test_loss": 0.6,
        },
    )
    results = collect_results(tmp_path)
    assert len(results) == sum(len(losses) for losses in LOSSES.values())
    rerun = results[(results.method == "none") & (results.lr == 1e-3) & (results.seed == 0)]
    assert rerun.test_loss.tolist() == [0.6]


def _fail_job(
    directory, error_type="ConfigError", message="selection.horizon=-2 must be an integer of at least 0"
):
    """Write the failed.json and Hydra config that a failed `attrbench select` job leaves."""
    (directory / ".hydra").mkdir(parents=True, exist_ok=True)
    (directory / ".hydra" / "config.yaml").write_text("selection:\n  method: lookahead\noptimizer:\n  lr: 0.001\n")
    write_json(
        directory / "failed.json",
        {"status": "failed", "error_type": error_type, "message": message, "overrides": ["selection.horizon=-2"]},
    )


def test_failed_rerun_result_is_left_out(tmp_path):
    _write_runs(tmp_path)
    _fail_job(tmp_path / "none_None_0.001_0")

    results = collect_results(tmp_path)

    assert len(results) == sum(len(losses) for losses in LOSSES.values()) - 1
    assert not results["path"].str.contains("none_None_0.001_0").any()
    none = selection_table(results).query("method == 'none' and lr == 0.001")
    assert none.seeds.iloc[0] == 2
    assert none.test_loss_mean.iloc[0] == pytest.approx(0.53)


def test_report_lists_failed_jobs(tmp_path, capsys):
    _write_runs(tmp_path)
    _fail_job(tmp_path / "lookahead_-2_0.001_0")
    _fail_job(tmp_path / "none_None_0.001_0", error_type="RuntimeError", message="CUDA out of memory")

    assert main([str(tmp_path), "--output", str(tmp_path / "report")]) == 0

    printed = capsys.readouterr().out
    failed = failed_jobs(tmp_path).set_index("run_dir")
    assert failed.index.tolist() == ["lookahead_-2_0.001_0", "none_None_0.001_0"]
    assert failed.loc["lookahead_-2_0.001_0", "message"] == (
        "ConfigError: selection.horizon=-2 must be an integer of at least 0"
    )
    assert failed.loc["none_None_0.001_0", "message"] == "RuntimeError: CUDA out of memory"
    assert "## Runs not counted" in printed
    assert "2 failed jobs" in printed
    assert "lookahead_-2_0.001_0" in printed
    assert "selection.horizon=-2 must be an integer of at least 0" in printed


def test_failed_run_job_is_not_listed(tmp_path):
    _write_runs(tmp_path)
    failed_run = tmp_path / "run_job"
    (failed_run / ".hydra").mkdir(parents=True)
    (failed_run / ".hydra" / "config.yaml").write_text("optimizer:\n  lr: 0.001\n")
    write_json(failed_run / "failed.json", {"status": "failed", "error_type": "ValueError", "message": "bad"})

    assert failed_jobs(tmp_path).empty


def test_all_jobs_failed_lists_them(tmp_path, capsys):
    _fail_job(tmp_path / "0")
    _fail_job(tmp_path / "1")

    assert main([str(tmp_path)]) == 1

    error = capsys.readouterr().err
    assert "no selection.json under" in error
    assert "2 failed jobs" in error
    assert "selection.horizon=-2 must be an integer of at least 0" in error


def test_report_writes_tables_and_figures(tmp_path):
    _write_runs(tmp_path / "runs")
    write_selection_report(tmp_path / "runs", tmp_path / "report")
    for name in (
        "selection.csv",
        "selection.md",
        "best_horizon.csv",
        "best_horizon.md",
        "test_loss_vs_horizon.png",
        "best_horizon_vs_lr.png",
    ):
        assert (tmp_path / "report" / name).is_file(), name


def test_pdf_figures_have_no_creation_date(tmp_path):
    _write_runs(tmp_path / "runs")
    table = selection_table(collect_results(tmp_path / "runs"))

    plot_loss_vs_horizon(table, tmp_path / "loss.pdf")
    plot_best_horizon(best_horizons(table), tmp_path / "best.pdf")

    assert b"/CreationDate" not in (tmp_path / "loss.pdf").read_bytes()
    assert b"/CreationDate" not in (tmp_path / "best.pdf").read_bytes()


def test_report_without_runs_fails_clearly(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no selection.json under" in capsys.readouterr().err


def test_report_on_missing_directory_fails(tmp_path, capsys):
    missing = tmp_path / "sweeps" / "sel"

    assert main([str(missing)]) == 1

    captured = capsys.readouterr()
    assert f"attrbench select-report: {missing} does not exist" in captured.err
    assert "no selection.json" not in captured.err
    assert captured.out == ""


def test_report_on_file_fails(tmp_path, capsys):
    path = tmp_path / "selection.json"
    path.write_text("{}")

    assert main([str(path)]) == 1

    assert f"attrbench select-report: {path} is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "selection.method=greedy",
            "selection.method='greedy' is not one of none, random, lookahead, offline",
        ),
        ("selection.horizon=-2", "selection.horizon=-2 must be an integer of at least 0"),
        ("selection.fraction=1.5", "selection.fraction=1.5 must lie in [0, 1)"),
        ("selection.fraction=half", "selection.fraction='half' is not a number"),
        (
            "selection.fraction=0.2 train.batch_size=2",
            "selection.fraction=0.2 drops no sample from batches of train.batch_size=2",
        ),
        (
            "selection.fraction=0.5 train.batch_size=1",
            "selection.fraction=0.5 drops no sample from batches of train.batch_size=1",
        ),
    ],
)
def test_invalid_selection_config_is_rejected(override, message):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("select", overrides=["selection.method=random", *override.split()])
    with pytest.raises(ConfigError) as error:
        validate_selection(cfg)
    assert message in str(error.value)


@pytest.mark.parametrize("method", ["none", "offline"])
def test_small_batch_is_valid_without_per_batch_drops(method):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("select", overrides=[f"selection.method={method}", "selection.fraction=0.5", "train.batch_size=1"])
    validate_selection(cfg)
