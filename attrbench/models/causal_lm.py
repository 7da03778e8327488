"""Causal language models from transformers: pretrained GPT-2 and Llama, or tiny random ones.

Every model is returned ready for attribution: eager attention (the same arithmetic on every
device, and differentiable twice), dropout probabilities set to 0 and the module in eval mode (so
training is deterministic), no key-value cache, and all parameters trainable. Llama models get
the full-precision eager attention and RMSNorm of :mod:`attrbench.models.precision`, which equal
transformers' own in float32 and stay in float64 in a float64 run. The tokenizer spec passed with
the model fixes the vocabulary, so a tiny model's embedding matches its tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from attrbench.data.hub import unavailable_error
from attrbench.data.tokenization import load_tokenizer
from attrbench.models.precision import FULL_PRECISION_EAGER, register_full_precision_eager, replace_rms_norms

log = logging.getLogger(__name__)

ATTENTION = "eager"
# Dropout fields of the GPT-2 and Llama configs; all are set to 0 before the model is built.
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
                  "attention_dropout", "mlp_dropout", "hidden_dropout")


def load_pretrained(
    name: str,
    tokenizer: Mapping,
    path: str | None = None,
    gated: bool = False,
    embedded_hint: str | None = None,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path or name)``, prepared for attribution.

    Args:
        name: Hugging Face Hub id, for example ``gpt2`` or ``meta-llama/Llama-3.2-1B``.
        tokenizer: Tokenizer spec; its vocabulary must fit the model's embedding.
        path: Local directory written by ``save_pretrained``; replaces ``name`` for loading.
        gated: Whether the Hub repository needs an accepted license (changes the error message).
        embedded_hint: Overrides that select the offline variant, named in error messages.

    Raises:
        SourceUnavailableError: The model is neither reachable nor cached and ``path`` is unset.
        ValueError: The tokenizer's vocabulary is larger than the model's embedding.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source = path or name
    if path is not None and not (Path(path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={path!r} contains no config.json; save the model there with model.save_pretrained(path)"
        )
    try:
        config = AutoConfig.from_pretrained(source)
        _disable_dropout(config)
        attention = _attention_for(config.model_type)
        model = AutoModelForCausalLM.from_pretrained(source, config=config, attn_implementation=attention)
    except OSError as error:
        if path is not None:
            raise
        raise unavailable_error("model", name, error, "model.path", embedded_hint, gated) from error
    _check_vocabulary(model, load_tokenizer(tokenizer), source)
    return prepare_for_attribution(model, "full")


def tiny_gpt2(
    tokenizer: Mapping,
    n_positions: int = 128,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
) -> nn.Module:
    """Build a randomly initialised ``GPT2LMHeadModel`` (the real architecture, small widths).

    The vocabulary size is the tokenizer's; the output layer is tied to the token embedding,
    as in GPT-2.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    text_tokenizer = load_tokenizer(tokenizer)
    config = GPT2Config(
        vocab_size=len(text_tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id,
        attn_implementation=ATTENTION,
    )
    _disable_dropout(config)
    return prepare_for_attribution(GPT2LMHeadModel(config), "embedded")


def tiny_llama(
    tokenizer: Mapping,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
    rope_theta: float = 500000.0,
) -> nn.Module:
    """Build a randomly initialised ``LlamaForCausalLM`` (the real architecture, small widths).

    Like Llama 3.2-1B it uses grouped-query attention (fewer key-value heads than query heads)
    and ties the output layer to the token embedding. The vocabulary size is the tokenizer's.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    text_tokenizer = load_tokenizer(tokenizer)
    config = LlamaConfig(
        vocab_size=len(text_tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        tie_word_embeddings=True,
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id,
        attn_implementation=_attention_for("llama"),
    )
    _disable_dropout(config)
    return prepare_for_attribution(LlamaForCausalLM(config), "embedded")


def prepare_for_attribution(model: nn.Module, variant: str) -> nn.Module:
    """Switch dropout off, use eval mode and no cache, and record the model's ``variant``.

    ``variant`` is ``"full"`` for pretrained weights and ``"embedded"`` for a tiny random model;
    the run summary reports it.
    """
    expected = _attention_for(model.config.model_type)
    if model.config._attn_implementation != expected:
        raise ValueError(f"expected attention {expected!r}, got {model.config._attn_implementation!r}")
    if model.config.model_type == "llama":
        replace_rms_norms(model)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.config.use_cache = False
    model.eval()
    model.requires_grad_(True)
    model.attrbench_variant = variant
    return model


def _attention_for(model_type: str) -> str:
    if model_type == "llama":
        register_full_precision_eager()
        return FULL_PRECISION_EAGER
    return ATTENTION


def _disable_dropout(config) -> None:
    for field in DROPOUT_FIELDS:
        if hasattr(config, field):
            setattr(config, field, 0.0)


def _check_vocabulary(model: nn.Module, tokenizer, source: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the embedding of {source} has {rows} rows; "
            "load the tokenizer that belongs to the model"
        )
