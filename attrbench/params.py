"""Flat parameter vectors.

All training, replay, ground truth and influence code treats a model's trainable parameters as
one 1-D tensor ``theta``. A :class:`ParameterLayout` maps that vector to the named tensors that
``torch.func.functional_call`` expects, so optimizer states, adjoints and stored checkpoints are
plain vectors of the same length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of a module's trainable parameters, in ``named_parameters`` order.

    Tied parameters (one tensor registered under two names) appear once, as
    ``named_parameters`` lists them; ``functional_call`` re-ties them.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_module(cls, module: nn.Module) -> ParameterLayout:
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(shape).numel()) for shape in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named tensors into one vector in layout order."""
        return torch.cat([tensors[name].reshape(-1) for name in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a vector into named views with the layout's shapes (differentiable)."""
        if theta.shape[-1] != self.numel:
            raise ValueError(
                f"parameter vector has {theta.shape[-1]} entries but the layout needs {self.numel}"
            )
        pieces = torch.split(theta, self.numels)
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def unflatten_stack(self, thetas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``[M, P]`` stacked vectors into named ``[M, *shape]`` tensors (copies, contiguous)."""
        pieces = torch.split(thetas, self.numels, dim=-1)
        return {
            name: piece.reshape(len(thetas), *shape).contiguous()
            for name, piece, shape in zip(self.names, pieces, self.shapes)
        }

    def flatten_stack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named ``[M, *shape]`` tensors into ``[M, P]`` stacked vectors."""
        return torch.cat([tensors[name].flatten(1) for name in self.names], dim=1)

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, data: dict) -> ParameterLayout:
        return cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]))
