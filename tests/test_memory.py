"""The memory plan: its sizes, the budget check, and the refusal before training starts."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attrbench.app import CONFIG_DIR
from attrbench.experiment import build_experiment
from attrbench.memory import (
    ACTIVATION_FACTOR, GB, MemoryBudgetError, check_memory, device_memory_bytes, plan_memory,
)
from attrbench.training.optim import OptimizerSpec
from attrbench.training.trajectory import checkpoint_steps

from test_cli import TINY, run_cli

SETTINGS = ("trajectory.checkpoint_every", "influence.query_chunk_size", "groundtruth.chunk_size",
            "train.micro_batch_size")


def make_experiment(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    return build_experiment(cfg)


def with_settings(experiment, optimizer: OptimizerSpec | None = None, **settings):
    """A copy of ``experiment`` with config keys (dots as double underscores) and optimizer replaced.

    Copying avoids building a new experiment, which reloads the data.
    """
    config = copy.deepcopy(experiment.config)
    for key, value in settings.items():
        OmegaConf.update(config, key.replace("__", "."), value)
    return dataclasses.replace(experiment, config=config, optimizer=optimizer or experiment.optimizer)


def item(plan, part: str):
    (found,) = [entry for entry in plan.items if entry.part == part]
    return found


@pytest.fixture(scope="module")
def experiment():
    # TINY: 256 training and 16 test images, 12 removed samples in chunks of 5, query chunk 8.
    return make_experiment("trajectory.checkpoint_every=3")


def test_plan_sizes(experiment):
    plan = plan_memory(experiment, budget_gb=None)
    params, steps = experiment.task.num_parameters, experiment.batches.num_steps
    stored = len(checkpoint_steps(steps, 3))

    # AdamW keeps two moments, so a checkpoint is 3 parameter vectors of 8-byte float64 values.
    assert item(plan, "checkpoint copy being written").nbytes == 3 * params * 8
    assert plan.disk_bytes == stored * 3 * params * 8
    assert item(plan, "adjoint state").nbytes == 3 * 8 * params * 8
    assert item(plan, "ground-truth models").nbytes == (5 + 1) * 4 * params * 8
    assert item(plan, "replayed segment").nbytes == 3 * 5 * params * 8
    assert item(plan, "parameters").nbytes == params * 8


def test_plan_follows_method_and_optimizer(experiment):
    sgd = OptimizerSpec.from_config({"_target_": "torch.optim.SGD"})
    plan = plan_memory(with_settings(experiment, sgd, influence__methods=["sgd_influence"]), budget_gb=None)
    params = item(plan, "parameters").nbytes // 8
    assert item(plan, "adjoint state").nbytes == 1 * 8 * params * 8
    assert item(plan, "ground-truth models").nbytes == (5 + 1) * 2 * params * 8


def test_activation_estimate_counts_the_input(experiment):
    plan = plan_memory(experiment, budget_gb=None)
    per_batch = item(plan, "activations (estimate)").nbytes
    batch = int(experiment.batches.sizes.max())
    # The first linear layer saves its 784-value input row of every sample for the weight gradient.
    saved = per_batch / ACTIVATION_FACTOR
    assert saved >= batch * 784 * 8
    assert saved < batch * 784 * 8 * 2


def test_peak_is_run_plus_largest_stage(experiment):
    plan = plan_memory(experiment, budget_gb=None)
    stages = {stage: plan.stage_bytes(stage) for stage in ("train", "groundtruth", "influence")}
    assert plan.peak_bytes == plan.stage_bytes("run") + max(stages.values())


def test_plan_within_budget_is_logged(experiment, caplog):
    with caplog.at_level(logging.INFO, logger="attrbench.memory"):
        plan = check_memory(with_settings(experiment, memory__budget_gb=1000))
    assert plan.budget_bytes == 1000 * GB
    assert "memory plan on cpu" in caplog.text
    assert "adjoint state" in caplog.text


def test_plan_over_budget_is_refused(experiment):
    with pytest.raises(MemoryBudgetError) as error:
        check_memory(with_settings(experiment, memory__budget_gb=1e-6))
    message = str(error.value)
    plan = plan_memory(experiment, budget_gb=None)
    assert f"{plan.peak_bytes / GB:.3f} GB" in message
    assert "memory.budget_gb=1e-06" in message
    for setting in SETTINGS:
        assert setting in message
    assert "memory.budget_gb=null" in message


def test_refusal_names_largest_setting_first(experiment):
    with pytest.raises(MemoryBudgetError) as error:
        check_memory(with_settings(experiment, influence__query_chunk_size=16, memory__budget_gb=1e-6))
    advice = str(error.value).split("largest effect first):\n")[1].splitlines()
    assert advice[0].strip().startswith("influence.query_chunk_size (now 16)")


def test_refusal_names_capped_setting(experiment):
    # 12 removed samples: a chunk of 50 trains 12 counterfactual models at once, as would 12.
    with pytest.raises(MemoryBudgetError) as error:
        check_memory(with_settings(experiment, groundtruth__chunk_size=50, memory__budget_gb=1e-6))
    message = str(error.value)
    assert "groundtruth.chunk_size (now 50, but this run uses 12, so only a value below 12 has an effect)" in message
    assert "influence.query_chunk_size (now 8):" in message


def test_null_budget_skips_the_check(experiment):
    plan = plan_memory(experiment, budget_gb=None)
    plan.check()
    assert plan.budget_bytes is None


def test_auto_budget_is_device_memory(experiment):
    plan = plan_memory(experiment, budget_gb="auto")
    assert plan.budget_bytes == device_memory_bytes(experiment.device)
    assert plan.budget_bytes > 0


@pytest.mark.parametrize("value", ["lots", 0, -2])
def test_invalid_budget_rejected(experiment, value):
    with pytest.raises(ValueError, match="must be auto, a positive number of GB, or null"):
        plan_memory(experiment, budget_gb=value)


def test_cli_refuses_before_training(tmp_path):
    cache = tmp_path / "cache"
    result = run_cli("run", *TINY, "memory.budget_gb=1e-6", f"cache_dir={cache}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "the memory plan needs an estimated" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (cache / "train").exists()


def test_plan_counts_second_order_tangents(experiment):
    from attrbench.memory import plan_memory as plan_of

    with_second = with_settings(experiment, influence__methods=["adamw_influence", "second_order"],
                                influence__sample_chunk_size=5)
    plan = plan_of(with_second, budget_gb=None)
    params = experiment.task.num_parameters
    assert item(plan, "second-order tangents").nbytes == 6 * 5 * params * 8
    assert all(row.part != "second-order tangents" for row in plan_of(experiment, budget_gb=None).items)
