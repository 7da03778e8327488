"""Forward pass of many copies of one sequential model on a shared batch, without ``vmap``.

Leave-one-out retraining trains M copies of the same network, each with its own parameters, on
the same batch at every step. Under ``vmap`` the first linear layer becomes M separate matrix
products against the same input: a batched product whose input is broadcast M times. Here that
layer is a single matrix product, ``x @ [W_1; ...; W_M]^T``, whose weight operand is the M
weight matrices stacked along the output dimension. For the MNIST MLP this layer contains 96% of
the parameters and of the arithmetic. Later linear layers see a different input per copy and
use one batched product. Each copy's outputs are the same numbers that
``functional_call(model, params_m, x)`` computes, up to rounding, and autograd through this
forward gives each copy's own gradient.

Only :class:`torch.nn.Sequential` models built from the layers in :data:`ELEMENTWISE`,
:class:`torch.nn.Linear` and a default :class:`torch.nn.Flatten` are supported (the
:class:`~attrbench.models.mlp.MLP` of every setting that uses one). For anything else
:func:`supports_stacking` is false and callers fall back to ``vmap``.
"""

from __future__ import annotations

import torch
from torch import nn

# Modules that act on each entry separately, so they apply unchanged to a stack of outputs.
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Identity)


def supports_stacking(model: nn.Module) -> bool:
    """Return whether :func:`stacked_forward` can evaluate ``model``."""
    if not isinstance(model, nn.Sequential) or len(model) == 0 or list(model.buffers()):
        return False
    for layer in model:
        if isinstance(layer, nn.Flatten):
            if (layer.start_dim, layer.end_dim) != (1, -1):
                return False
        elif not isinstance(layer, (nn.Linear, *ELEMENTWISE)):
            return False
    return any(isinstance(layer, nn.Linear) for layer in model)


def stacked_forward(model: nn.Sequential, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Evaluate M copies of ``model`` on one batch.

    Args:
        model: A model for which :func:`supports_stacking` is true; only its structure is used.
        params: Parameters by name as in ``model.named_parameters()``, each with a leading
            dimension of size M (one entry per copy).
        inputs: The batch shared by all copies, ``[B, ...]``.

    Returns:
        ``[M, B, ...]`` outputs: entry m is the output of the copy with parameters ``params[.][m]``.
    """
    hidden, copies = inputs, None  # ``copies`` stays None while all copies share one input tensor
    for name, layer in model.named_children():
        if isinstance(layer, nn.Flatten):
            hidden = hidden.flatten(1 if copies is None else 2)
        elif isinstance(layer, nn.Linear):
            weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
            if copies is None:
                hidden, copies = _shared_input_linear(hidden, weight, bias), weight.shape[0]
            elif bias is None:
                hidden = torch.bmm(hidden, weight.transpose(1, 2))
            else:
                hidden = torch.baddbmm(bias.unsqueeze(1), hidden, weight.transpose(1, 2))
        else:
            hidden = layer(hidden)
    if copies is None:  # supports_stacking requires a linear layer; this guards direct callers
        raise ValueError("stacked_forward needs a model with at least one nn.Linear layer")
    return hidden


def _shared_input_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[M, B, out]`` outputs of M linear layers (weights ``[M, out, in]``) on one ``[B, in]`` input."""
    copies, out_features, in_features = weight.shape
    stacked_weight = weight.reshape(copies * out_features, in_features)
    if bias is None:
        outputs = inputs @ stacked_weight.T
    else:
        outputs = torch.addmm(bias.reshape(1, copies * out_features), inputs, stacked_weight.T)
    return outputs.view(len(inputs), copies, out_features).transpose(0, 1)
