"""Per-sample causal language-model loss for transformers models.

A text batch is ``{"input_ids", "attention_mask", "labels"}``, each ``[B, L]`` and
``torch.long``. ``labels`` equals ``input_ids`` at the tokens a sample is trained or scored on and
is -100 elsewhere (padding, and the prompt of an instruction example). Token ``k`` of a sample is
predicted from tokens ``0 .. k-1``, so the loss compares the logits at positions ``0 .. L-2`` with
the labels at ``1 .. L-1``, as transformers' own causal-LM loss does.

The loss runs the model through ``torch.func.functional_call`` and composes with ``vmap``, ``grad``
and ``jvp`` (tested with transformers 4.53 and 5.25, GPT-2 and Llama, eager attention). The model
gets explicit position ids, no key-value cache, and a ready 4D additive attention mask, so none of
its own mask code runs: in transformers 4.53, GPT-2 builds its mask with an in-place update that
fails under ``vmap`` over samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attrbench.tasks import Batch

IGNORE_INDEX = -100
TEXT_KEYS = ("input_ids", "attention_mask", "labels")


def causal_lm_loss(model: nn.Module, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's loss tokens, shape ``[B]``.

    A sample without any loss token gets loss 0 (and so no gradient); the data loaders reject
    such samples, so this only guards the division.
    """
    batch = trim_padding(batch)
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    _check_length(model, input_ids.shape[-1])
    # Counting attended tokens gives each token its position for right- and left-padded rows alike.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    dtype = next(value.dtype for value in params.values() if value.is_floating_point())
    inputs = {
        "input_ids": input_ids,
        "attention_mask": additive_attention_mask(attention_mask, dtype),
        "position_ids": position_ids,
        "use_cache": False,
    }
    logits = functional_call(model, params, (), inputs).logits
    predicted, targets = logits[..., :-1, :], labels[..., 1:]
    token_losses = F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
    return token_losses.sum(-1) / counts.to(token_losses.dtype)


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a ``[B, L]`` padding mask into the ``[B, 1, L, L]`` causal mask that eager attention adds.

    Entry ``(q, k)`` is 0 where query ``q`` may attend to key ``k`` (``k <= q`` and ``k`` is not
    padding) and the dtype's minimum elsewhere, the values transformers' eager masks use.
    """
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool().unsqueeze(-2)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=attention_mask.device), blocked).unsqueeze(-3)


def trim_padding(batch: Batch) -> Batch:
    """Drop the trailing columns that are padding in every row of ``batch``.

    Under causal attention no real token attends to a later position, so the cut changes no loss
    beyond rounding. Inside ``vmap`` over samples each row is a batched tensor whose length
    cannot be read, and the batch is returned unchanged.
    """
    mask = batch["attention_mask"]
    if mask.ndim != 2 or mask.shape[1] == 0 or _is_vmapped(mask):
        return batch
    attended = mask.any(dim=0).nonzero()
    length = int(attended[-1]) + 1 if len(attended) else 1
    if length == mask.shape[1]:
        return batch
    return {key: value[:, :length] if key in TEXT_KEYS else value for key, value in batch.items()}


def _is_vmapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is batched by an enclosing ``vmap`` (at any level of ``torch.func``).

    NOTE: torch has no public API for this; the private functions used here exist in torch 2.14.
    Without them it returns True, which only disables the padding cut.
    """
    functorch = getattr(torch._C, "_functorch", None)
    needed = ("is_functorch_wrapped_tensor", "is_batchedtensor", "get_unwrapped")
    if functorch is None or not all(hasattr(functorch, name) for name in needed):
        return True
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def _check_length(model: nn.Module, length: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(
            f"sequences of {length} tokens exceed the model's {limit} positions; "
            "lower data.block_size or data.max_length, or raise the model's position count"
        )
