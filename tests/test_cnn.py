"""The CNN: shapes, construction from data, and exact influence through convolutions and pooling."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from attrbench.data import DataSplits
from attrbench.experiment import build_model
from attrbench.influence import compute_influence
from attrbench.influence.adamw import AdamWInfluence
from attrbench.influence.sgd import SGDInfluence
from attrbench.models.cnn import ConvNet
from attrbench.tasks import Task, classification_loss
from attrbench.training.optim import OptimizerSpec
from attrbench.training.schedule import BatchSchedule, learning_rates
from attrbench.training.trainer import train

from conftest import EXACT_RTOL, max_relative_error
from reference import weight_derivatives

TINY_SHAPE = (2, 10, 10)
NUM_TRAIN = 13


def test_parameter_counts():
    cifar = ConvNet((3, 32, 32))
    mnist = ConvNet((1, 28, 28))
    assert sum(p.numel() for p in cifar.parameters()) == 62_006
    assert sum(p.numel() for p in mnist.parameters()) == 44_426


def test_flat_and_image_inputs_agree():
    torch.manual_seed(0)
    model = ConvNet((1, 28, 28))
    images = torch.rand(3, 1, 28, 28)
    logits = model(images)
    assert logits.shape == (3, 10)
    assert torch.equal(model(images.reshape(3, 784)), logits)


def test_too_small_image_rejected():
    with pytest.raises(ValueError, match="shrink"):
        ConvNet((1, 8, 8))


def test_missing_input_shape_rejected():
    with pytest.raises(ValueError, match="model.input_shape=None"):
        ConvNet(None)


def test_build_model_takes_shape_from_data():
    config = OmegaConf.create({"_target_": "attrbench.models.cnn.ConvNet", "input_shape": None})
    images = {"x": torch.zeros(2, 784), "y": torch.zeros(2, dtype=torch.long)}
    data = DataSplits(images, images, source="test", image_shape=(1, 28, 28))
    assert build_model(config, data).input_shape == (1, 28, 28)

    unshaped = DataSplits(images, images, source="test")
    with pytest.raises(ValueError, match="set model.input_shape"):
        build_model(config, unshaped)


@pytest.fixture
def tiny_cnn_problem():
    """Two convolution blocks with max-pooling, a hidden layer, AdamW with decay and warmup."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_TRAIN + 3, *TINY_SHAPE, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (NUM_TRAIN + 3,), generator=generator)
    train_data, test_data = {"x": x[:NUM_TRAIN], "y": y[:NUM_TRAIN]}, {"x": x[NUM_TRAIN:], "y": y[NUM_TRAIN:]}
    torch.manual_seed(0)
    model = ConvNet(TINY_SHAPE, channels=(3, 4), kernel_size=3, hidden_dims=(5,), num_classes=3)
    task = Task(model.to(torch.float64), classification_loss)
    batches = BatchSchedule.shuffled(NUM_TRAIN, batch_size=4, epochs=2, seed=1)
    lrs = learning_rates("linear", 0.05, batches.num_steps, warmup_ratio=0.2)
    return task, train_data, test_data, batches, lrs


def test_adamw_influence_equals_autograd_on_cnn(tiny_cnn_problem):
    task, train_data, test_data, batches, lrs = tiny_cnn_problem
    optimizer = OptimizerSpec.from_config(
        {"_target_": "torch.optim.AdamW", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    )
    trajectory = train(task, train_data, batches, lrs, optimizer, checkpoint_every=3, progress=False)
    scores = compute_influence(AdamWInfluence(), task, train_data, test_data, trajectory,
                               query_chunk_size=2, progress=False)

    expected = weight_derivatives(task, train_data, test_data, batches, lrs, "AdamW",
                                  optimizer.hyperparameters(), torch.arange(NUM_TRAIN))
    assert torch.isfinite(scores.derivative).all()
    assert expected.abs().max() > 0
    assert max_relative_error(scores.derivative, expected) < EXACT_RTOL


def test_sgd_influence_equals_autograd_on_cnn(tiny_cnn_problem):
    task, train_data, test_data, batches, lrs = tiny_cnn_problem
    optimizer = OptimizerSpec.from_config({"_target_": "torch.optim.SGD", "weight_decay": 0.01})
    lrs = [10 * lr for lr in lrs]
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    scores = compute_influence(SGDInfluence(), task, train_data, test_data, trajectory,
                               query_chunk_size=3, progress=False)

    expected = weight_derivatives(task, train_data, test_data, batches, lrs, "SGD",
                                  optimizer.hyperparameters(), torch.arange(NUM_TRAIN))
    assert max_relative_error(scores.derivative, expected) < EXACT_RTOL
