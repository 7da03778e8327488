"""Multilayer perceptron classifier."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """Fully connected network (ReLU by default); inputs are flattened first.

    The study's MNIST model is ``MLP(784, (16, 16), 10)``: 13,002 parameters. ``activation="gelu"``
    or ``"tanh"`` gives a smooth loss, so test losses change smoothly with a sample's weight.
    With ReLU they jump wherever a perturbation flips the sign of a hidden unit's input.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (16, 16),
        num_classes: int = 10,
        activation: str = "relu",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r} is not one of {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
