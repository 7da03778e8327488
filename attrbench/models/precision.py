"""Llama in float64 without float32 pieces.

transformers' Llama (checked with versions 4.53 and 5.25) computes the eager attention softmax
and the RMSNorm statistics in float32 whatever the model's dtype. A float64 run then evaluates a function that is
only float32-accurate, and two exact ways of differentiating it (the influence adjoint and autograd
through the unrolled run) disagree at about 1e-7. The two replacements below compute those pieces
in float32 or in the input's dtype, whichever is wider: for float32 and narrower inputs they do
the same arithmetic as transformers, and for float64 inputs they stay in float64.

The rotary position tables are still computed in float32; they depend only on the positions, not
on the parameters, so they fix the function without limiting the precision of its derivatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Name under which the attention function below is registered with transformers.
FULL_PRECISION_EAGER = "attrbench_eager"


def full_precision_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention as transformers' Llama computes it, with the softmax in the wider dtype.

    Args:
        module: The attention module; ``num_key_value_groups`` query heads share a key-value head.
        query: ``[batch, heads, queries, head_dim]``.
        key: ``[batch, key_value_heads, keys, head_dim]``.
        value: Like ``key``.
        attention_mask: Additive mask ``[batch, 1, queries, keys]`` (0 or the dtype's minimum).
        scaling: Factor applied to the scores, normally ``head_dim ** -0.5``.
        dropout: Dropout probability on the attention weights (applied in training mode only).

    Returns:
        ``(output [batch, queries, heads, head_dim], weights [batch, heads, queries, keys])``.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key = _repeat_key_value_heads(key, groups)
    value = _repeat_key_value_heads(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    weights = F.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class FullPrecisionRMSNorm(nn.Module):
    """Llama's RMSNorm, ``weight * x / sqrt(mean(x^2) + eps)``, in the wider of float32 and x's dtype."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def register_full_precision_eager() -> None:
    """Register the attention function and eager's additive mask under ``FULL_PRECISION_EAGER``.

    transformers builds no mask at all for an attention name without a registered mask function,
    so both registrations are needed. Repeated calls are harmless.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(FULL_PRECISION_EAGER, full_precision_eager_attention)
    AttentionMaskInterface.register(FULL_PRECISION_EAGER, eager_mask)


def replace_rms_norms(model: nn.Module) -> int:
    """Swap every ``LlamaRMSNorm`` in ``model`` for :class:`FullPrecisionRMSNorm` on the same weight.

    The parameter objects and names are unchanged, so the parameter layout stays the same.

    Returns:
        The number of modules replaced.
    """
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, LlamaRMSNorm)]
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, FullPrecisionRMSNorm(module.weight, module.variance_epsilon))
    return len(targets)


def _repeat_key_value_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return states
    batch, heads, length, width = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, width).reshape(batch, heads * groups, length, width)
