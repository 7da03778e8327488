"""Tiny causal language-model problems in float64: a GPT-2 on text blocks, a Llama on SFT pairs."""

from __future__ import annotations

import torch

from attrbench.causal_lm import causal_lm_loss
from attrbench.data.sft import build_sft_splits
from attrbench.data.text_blocks import load_embedded_text
from attrbench.data.tokenization import load_tokenizer
from attrbench.models.causal_lm import tiny_gpt2, tiny_llama
from attrbench.tasks import Task

# A 300-token byte-level BPE: big enough for real words, small enough for cheap logits.
TOKENIZER = {"name": "embedded_bpe", "vocab_size": 300}

SHORT_TEMPLATES = {
    "prompt": "Q: {instruction}\nIn: {input}\nA: ",
    "prompt_no_input": "Q: {instruction}\nA: ",
    "summary_instruction": "Sum up.",
}
ALPACA_RECORDS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend."},
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
    {"instruction": "Count to three.", "input": "", "output": "1, 2, 3"},
    {"instruction": "Is ice cold?", "input": "", "output": "Yes, it is."},
    {"instruction": "Pick a fruit.", "input": "apple or stone", "output": "apple"},
    {"instruction": "Spell cat.", "input": "", "output": "c-a-t"},
    {"instruction": "Name a day.", "input": "", "output": "Monday"},
]
SAMSUM_RECORDS = [
    {"id": "1", "dialogue": "Ann: tea?\r\nBob: yes", "summary": "Bob wants tea."},
    {"id": "2", "dialogue": "Cy: late\r\nDee: ok", "summary": "Cy is late."},
    {"id": "3", "dialogue": "Eve: rain\r\nFay: bring a coat", "summary": "It rains."},
]


def tiny_gpt2_problem(seed: int = 0):
    """A one-layer GPT-2 (width 8) and 10 training and 3 test blocks of 8 tokens of pydoc text."""
    torch.manual_seed(seed)
    model = tiny_gpt2(TOKENIZER, n_positions=16, n_embd=8, n_layer=1, n_head=2).to(torch.float64)
    data = load_embedded_text(TOKENIZER, block_size=8, num_train=10, num_test=3)
    return Task(model, causal_lm_loss), data.train, data.test


def tiny_llama_problem(seed: int = 0):
    """A one-layer Llama (width 8, grouped-query attention) and right-padded prompt-masked pairs."""
    torch.manual_seed(seed)
    model = tiny_llama(
        TOKENIZER, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    ).to(torch.float64)
    data = build_sft_splits(load_tokenizer(TOKENIZER), ALPACA_RECORDS, SAMSUM_RECORDS, 64, SHORT_TEMPLATES)
    return Task(model, causal_lm_loss), data.train, data.test
