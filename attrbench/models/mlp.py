"""Multilayer perceptron classifier."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Fully connected ReLU network; inputs are flattened first.

    The study's MNIST model is ``MLP(784, (16, 16), 10)``: 13,002 parameters.
    """

    def __init__(self, input_dim: int = 784, hidden_dims: Sequence[int] = (16, 16), num_classes: int = 10):
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
