"""Causal-LM constructors: local pretrained copies, Llama's full-precision pieces, and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attrbench.data.hub import SourceUnavailableError
from attrbench.data.tokenization import load_tokenizer
from attrbench.models.causal_lm import load_pretrained, tiny_gpt2, tiny_llama
from attrbench.models.precision import FULL_PRECISION_EAGER, FullPrecisionRMSNorm

from lm_problems import TOKENIZER, tiny_llama_problem

TINY_LLAMA = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 64}


def _save_with_tokenizer(model, directory) -> None:
    model.save_pretrained(directory)
    load_tokenizer(TOKENIZER).save_pretrained(directory)


def _assert_ready(model) -> None:
    assert not model.training
    assert all(module.p == 0.0 for module in model.modules() if isinstance(module, nn.Dropout))
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert model.config.use_cache is False


def test_llama_matches_transformers_in_float32():
    """In float32 the full-precision attention and RMSNorm do transformers' exact arithmetic."""
    from transformers import LlamaForCausalLM

    task, train_data, _ = tiny_llama_problem()
    ours = task.model.to(torch.float32)
    config = ours.config.__class__.from_dict(ours.config.to_dict())
    config._attn_implementation = "eager"
    stock = LlamaForCausalLM(config).eval()
    stock.load_state_dict(ours.state_dict())
    inputs = {"input_ids": train_data["input_ids"], "attention_mask": train_data["attention_mask"]}
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, stock(**inputs).logits)
    assert any(isinstance(module, FullPrecisionRMSNorm) for module in ours.modules())
    assert ours.config._attn_implementation == FULL_PRECISION_EAGER


def test_local_gpt2_copy_loads_ready(tmp_path):
    torch.manual_seed(0)
    original = tiny_gpt2(TOKENIZER, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    original.config.resid_pdrop = 0.1
    _save_with_tokenizer(original, tmp_path)

    model = load_pretrained("gpt2", {"name": "gpt2", "path": str(tmp_path)}, path=str(tmp_path))
    _assert_ready(model)
    assert model.config.resid_pdrop == 0.0
    assert model.config._attn_implementation == "eager"
    assert model.attrbench_variant == "full"
    for (name, expected), (_, loaded) in zip(original.state_dict().items(), model.state_dict().items()):
        assert torch.equal(expected, loaded), name


def test_local_llama_copy_loads_full_precision(tmp_path):
    torch.manual_seed(0)
    _save_with_tokenizer(tiny_llama(TOKENIZER, **TINY_LLAMA), tmp_path)

    model = load_pretrained("meta-llama/Llama-3.2-1B", {"name": "x", "path": str(tmp_path)}, path=str(tmp_path),
                            gated=True)
    _assert_ready(model)
    assert model.config._attn_implementation == FULL_PRECISION_EAGER
    norms = [module for module in model.modules() if isinstance(module, FullPrecisionRMSNorm)]
    assert len(norms) == 3


def test_tokenizer_larger_than_embedding_rejected(tmp_path):
    torch.manual_seed(0)
    tiny_gpt2(TOKENIZER, n_positions=16, n_embd=8, n_layer=1, n_head=2).save_pretrained(tmp_path)
    bigger = {"name": "embedded_bpe", "vocab_size": 400}
    with pytest.raises(ValueError, match="the tokenizer has 400 tokens but the embedding"):
        load_pretrained("gpt2", bigger, path=str(tmp_path))


def test_gated_model_error_explains_authentication():
    spec = {"name": "meta-llama/Llama-3.2-1B", "gated": True}
    with pytest.raises(SourceUnavailableError) as raised:
        load_pretrained("meta-llama/Llama-3.2-1B", spec, gated=True, embedded_hint="data=embedded_sft model=tiny_llama")
    message = str(raised.value)
    assert "'meta-llama/Llama-3.2-1B'" in message
    assert "accept its license" in message
    assert "huggingface-cli login" in message
    assert "HF_TOKEN" in message
    assert "model.path" in message
    assert "data=embedded_sft model=tiny_llama" in message


def test_missing_tokenizer_names_ways_out():
    spec = {"name": "gpt2", "embedded_hint": "data=embedded_text model=tiny_gpt2"}
    with pytest.raises(SourceUnavailableError) as raised:
        load_tokenizer(spec)
    message = str(raised.value)
    assert "tokenizer 'gpt2'" in message
    assert "network access" in message
    assert "model.path" in message
    assert "data=embedded_text model=tiny_gpt2" in message
    assert "gated" not in message


def test_missing_local_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path=.*contains no config.json"):
        load_pretrained("gpt2", TOKENIZER, path=str(tmp_path))
