"""The stacked forward pass and stacked gradients against a plain loop over the models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from attrbench.models.cnn import ConvNet
from attrbench.models.mlp import MLP
from attrbench.models.stacked import stacked_forward, supports_stacking
from attrbench.tasks import Task, classification_loss

COPIES = 4


def _random_stack(model: nn.Module, copies: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(copies, *p.shape, generator=generator, dtype=torch.float64)
        for name, p in model.named_parameters()
    }


def _classification_data(num_samples: int, num_features: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, num_features, generator=generator, dtype=torch.float64)
    x[:, 0] = 0.0  # a feature that is zero in every sample
    return {"x": x, "y": torch.randint(0, 3, (num_samples,), generator=generator)}


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("hidden", [(), (5,), (5, 4)], ids=["linear", "one_hidden", "two_hidden"])
def test_stacked_forward_equals_each_model(activation, hidden):
    model = MLP(6, hidden, 3, activation=activation).to(torch.float64)
    params = _random_stack(model, COPIES, seed=0)
    inputs = torch.randn(7, 1, 2, 3, dtype=torch.float64)  # image-shaped: the MLP flattens it

    outputs = stacked_forward(model, params, inputs)

    assert outputs.shape == (COPIES, 7, 3)
    for copy in range(COPIES):
        expected = functional_call(model, {name: value[copy] for name, value in params.items()}, (inputs,))
        assert torch.allclose(outputs[copy], expected, rtol=1e-13, atol=1e-14), copy


def test_stacked_forward_without_biases():
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 2, bias=False)).to(torch.float64)
    params = _random_stack(model, COPIES, seed=1)
    inputs = torch.randn(3, 6, dtype=torch.float64)
    outputs = stacked_forward(model, params, inputs)
    for copy in range(COPIES):
        expected = functional_call(model, {name: value[copy] for name, value in params.items()}, (inputs,))
        assert torch.allclose(outputs[copy], expected, rtol=1e-13, atol=1e-14), copy


@pytest.mark.parametrize("micro_batch_size", [None, 3])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_stacked_gradient_equals_loop(micro_batch_size, activation):
    torch.manual_seed(0)
    model = MLP(6, (5, 4), 3, activation=activation).to(torch.float64)
    task = Task(model, classification_loss, micro_batch_size=micro_batch_size)
    assert task.stacks_without_vmap
    batch = _classification_data(8, 6, seed=2)
    base = task.initial_parameters()
    generator = torch.Generator().manual_seed(3)
    thetas = base + 0.3 * torch.randn(COPIES, len(base), generator=generator, dtype=torch.float64)
    weights = torch.ones(COPIES, 8, dtype=torch.float64)
    weights[1, 2] = 0.0
    weights[3, 7] = 0.0
    denominators = torch.tensor([8.0, 8.0, 8.0, 7.0], dtype=torch.float64)

    gradients, losses = task.stacked_gradient(task.layout.unflatten_stack(thetas), batch, weights, denominators)

    stacked = task.layout.flatten_stack(gradients)
    for name, value in gradients.items():
        assert value.is_contiguous(), name
    for copy in range(COPIES):
        expected, expected_losses = task.batch_gradient(thetas[copy], batch, weights[copy], denominators[copy])
        assert torch.allclose(stacked[copy], expected, rtol=1e-12, atol=1e-15), copy
        assert torch.allclose(losses[copy], expected_losses, rtol=1e-13), copy


def test_stacked_losses_equal_loop():
    torch.manual_seed(0)
    task = Task(MLP(6, (5,), 3).to(torch.float64), classification_loss)
    data = _classification_data(11, 6, seed=4)
    base = task.initial_parameters()
    thetas = base + 0.3 * torch.randn(COPIES, len(base), dtype=torch.float64)

    losses = task.stacked_losses(task.layout.unflatten_stack(thetas), data, chunk_size=4)

    for copy in range(COPIES):
        assert torch.allclose(losses[copy], task.evaluate_losses(thetas[copy], data), rtol=1e-13), copy


def test_which_models_stack():
    assert supports_stacking(MLP(6, (5,), 3))
    assert supports_stacking(nn.Sequential(nn.Linear(4, 2)))
    assert not supports_stacking(ConvNet((1, 12, 12), channels=(2,), hidden_dims=(4,)))
    assert not supports_stacking(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.1), nn.Linear(3, 2)))
    assert not supports_stacking(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))  # buffers
    assert not supports_stacking(nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(4, 2)))
    assert not supports_stacking(nn.Sequential(nn.ReLU()))
    assert not supports_stacking(nn.Linear(4, 2))  # not a Sequential


def test_unsupported_model_uses_vmap():
    torch.manual_seed(0)
    model = ConvNet((1, 6, 6), channels=(2,), kernel_size=3, hidden_dims=(4,), num_classes=3).to(torch.float64)
    task = Task(model, classification_loss)
    assert not task.stacks_without_vmap
    generator = torch.Generator().manual_seed(5)
    data = {"x": torch.randn(5, 36, generator=generator, dtype=torch.float64),
            "y": torch.randint(0, 3, (5,), generator=generator)}
    base = task.initial_parameters()
    thetas = base + 0.1 * torch.randn(3, len(base), generator=generator, dtype=torch.float64)
    weights = torch.ones(3, 5, dtype=torch.float64)
    weights[2, 1] = 0.0
    denominators = torch.full((3,), 5.0, dtype=torch.float64)

    gradients, losses = task.stacked_gradient(task.layout.unflatten_stack(thetas), data, weights, denominators)

    stacked = task.layout.flatten_stack(gradients)
    for copy in range(3):
        expected, expected_losses = task.batch_gradient(thetas[copy], data, weights[copy], denominators[copy])
        assert torch.allclose(stacked[copy], expected, rtol=1e-12, atol=1e-15), copy
        assert torch.allclose(losses[copy], expected_losses, rtol=1e-13), copy
