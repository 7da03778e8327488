"""The GPT-2 and Llama settings end to end through the real command line, on their embedded variants."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from test_cli import run_cli

COMMON = ["groundtruth.num_samples=6", "groundtruth.chunk_size=3", "influence.query_chunk_size=4", "progress=false",
          "model.tokenizer.vocab_size=300"]
SETTINGS = {
    "gpt2": ["setting=gpt2", "data=embedded_text", "model=tiny_gpt2", "data.num_train=24", "data.num_test=6",
             "data.block_size=16", "train.batch_size=8", "train.epochs=2", "evaluation.num_scored=4",
             "model.n_embd=16", "model.n_layer=1", "trajectory.checkpoint_every=2"],
    "llama": ["setting=llama", "data=embedded_sft", "model=tiny_llama", "data.num_train=12", "data.num_test=4",
              "train.batch_size=4", "model.hidden_size=16", "model.num_hidden_layers=1"],
}
EXPECTED = {"gpt2": {"num_train": 24, "num_test": 6, "num_scored": 4, "num_steps": 6, "dtype": "float64"},
            "llama": {"num_train": 12, "num_test": 4, "num_scored": 4, "num_steps": 3, "dtype": "float64"}}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_embedded_variant_runs_end_to_end(tmp_path, setting):
    run_dir = tmp_path / "run"
    result = run_cli("run", *SETTINGS[setting], *COMMON, f"hydra.run.dir={run_dir}",
                     f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)

    assert f"{setting} (embedded)" in result.stdout
    table = pd.read_csv(run_dir / "spearman.csv")
    assert list(table.method) == ["sgd_influence", "adamw_influence"]
    assert table.test_points.tolist() == [EXPECTED[setting]["num_scored"]] * 2
    assert table.spearman_mean.notna().all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["variant"] == "embedded"
    assert summary["setting"] == setting
    for key, value in EXPECTED[setting].items():
        assert summary[key] == value, key

