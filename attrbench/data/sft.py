"""Supervised fine-tuning data: Alpaca instructions for training, SAMSum summaries as tests.

Each example becomes ``[bos] + prompt + response + [eos]`` (``bos`` only if the tokenizer has
one), tokenized in two pieces so the boundary between prompt and response is exact. The labels
mask ``bos`` and the prompt with -100, so a sample's loss is the mean next-token loss over its
response and the closing end-of-text token. Sequences longer than ``max_length`` are cut from the
right; a sample whose response is cut away entirely is rejected.

Training examples fill the Alpaca prompt template with the record's instruction and input. A test
function is the loss of a SAMSum reference summary given the dialogue, written as an instruction
with the dialogue as input, so the fine-tuned model is scored in the format it was trained on. The templates are config
values (``data.templates``); the defaults are in ``conf/data/alpaca_samsum.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from importlib import resources

import torch

from attrbench.causal_lm import IGNORE_INDEX
from attrbench.data.hub import load_split
from attrbench.data.splits import DataSplits
from attrbench.data.tokenization import load_tokenizer, pad_token_id

log = logging.getLogger(__name__)

SFT_HINT = "data=embedded_sft model=tiny_llama"
ALPACA_FIELDS = ("instruction", "input", "output")
SAMSUM_FIELDS = ("dialogue", "summary")
EMBEDDED_ALPACA = "alpaca_embedded.json"
EMBEDDED_SAMSUM = "samsum_embedded.json"

DEFAULT_TEMPLATES = {
    "prompt": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "prompt_no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
    "summary_instruction": "Summarize the dialogue in one or two sentences.",
}


def load_alpaca_samsum(
    tokenizer: Mapping,
    alpaca: Mapping,
    samsum: Mapping,
    num_train: int | None = 512,
    num_test: int | None = 100,
    max_length: int = 512,
    templates: Mapping | None = None,
    seed: int = 0,
) -> DataSplits:
    """The first ``num_train`` Alpaca records and the first ``num_test`` SAMSum test dialogues.

    Args:
        tokenizer: Tokenizer spec (the model config's ``tokenizer`` node).
        alpaca: ``{name, config, split, path}`` of the instruction data. A ``path`` replaces the
            Hub: a JSON file of instruction/input/output records, a ``save_to_disk`` directory or
            a copy of the Hub repository.
        samsum: The same for the dialogues (records with id, dialogue and summary).
        num_train: Training examples from the start of the split; None takes all.
        num_test: Test dialogues from the start of the split; None takes all.
        max_length: Maximum tokens per sequence, special tokens included.
        templates: ``prompt``, ``prompt_no_input`` (used when a record's input is empty) and
            ``summary_instruction``; missing keys take the defaults above.
        seed: Unused; records are taken in order. Accepted because every loader gets one.

    Raises:
        SourceUnavailableError: A dataset is neither reachable nor cached and has no path.
        ValueError: On missing fields, too few records or responses cut away by ``max_length``.
    """
    del seed
    alpaca_records = _records(alpaca, "data.alpaca", ALPACA_FIELDS, num_train, "data.num_train")
    samsum_records = _records(samsum, "data.samsum", SAMSUM_FIELDS, num_test, "data.num_test")
    splits = build_sft_splits(load_tokenizer(tokenizer), alpaca_records, samsum_records, max_length, templates)
    sources = [_describe(alpaca, "alpaca"), _describe(samsum, "samsum")]
    splits.source = " + ".join(sources)
    splits.info["variant"] = "full"
    return splits


def load_embedded_sft(
    tokenizer: Mapping,
    num_train: int | None = None,
    num_test: int | None = None,
    max_length: int = 512,
    templates: Mapping | None = None,
    seed: int = 0,
) -> DataSplits:
    """The instruction and dialogue fixture shipped in ``attrbench/fixtures``, read like the real data.

    The fixture was written for this project in Alpaca's record format (a JSON list of
    instruction/input/output records) and SAMSum's (a JSON list of id/dialogue/summary records),
    and goes through the same ``datasets`` loading code as a local copy of either dataset.
    """
    fixtures = resources.files("attrbench") / "fixtures"
    with resources.as_file(fixtures / EMBEDDED_ALPACA) as alpaca_path, \
            resources.as_file(fixtures / EMBEDDED_SAMSUM) as samsum_path:
        splits = load_alpaca_samsum(
            tokenizer,
            {"path": str(alpaca_path)},
            {"path": str(samsum_path)},
            num_train=num_train,
            num_test=num_test,
            max_length=max_length,
            templates=templates,
            seed=seed,
        )
    splits.source = "embedded instructions + dialogues"
    splits.info["variant"] = "embedded"
    return splits


def build_sft_splits(
    tokenizer,
    alpaca_records: Sequence[Mapping],
    samsum_records: Sequence[Mapping],
    max_length: int,
    templates: Mapping | None = None,
) -> DataSplits:
    """Tokenize the records into training (instruction) and test (summary) batches."""
    if max_length < 2:
        raise ValueError(f"data.max_length={max_length} must be at least 2")
    chosen = {**DEFAULT_TEMPLATES, **dict(templates or {})}
    unknown = set(chosen) - set(DEFAULT_TEMPLATES)
    if unknown:
        raise ValueError(f"data.templates has unknown keys {sorted(unknown)}; known: {', '.join(DEFAULT_TEMPLATES)}")
    train_pairs = [(instruction_prompt(record, chosen), record["output"]) for record in alpaca_records]
    summary_record = {"instruction": chosen["summary_instruction"]}
    test_pairs = [
        (instruction_prompt({**summary_record, "input": record["dialogue"]}, chosen), record["summary"])
        for record in samsum_records
    ]
    train, train_stats = encode_pairs(tokenizer, train_pairs, max_length, "data.alpaca")
    test, test_stats = encode_pairs(tokenizer, test_pairs, max_length, "data.samsum")
    info = {"max_length": max_length, "train_tokens": train_stats, "test_tokens": test_stats}
    return DataSplits(train, test, "sft", info)


def instruction_prompt(record: Mapping, templates: Mapping) -> str:
    """Fill the prompt template of an Alpaca-style record, with or without its input section."""
    text_input = record.get("input") or ""
    if text_input.strip():
        return templates["prompt"].format(instruction=record["instruction"], input=text_input)
    return templates["prompt_no_input"].format(instruction=record["instruction"])


def encode_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, config_key: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tokenize ``(prompt, response)`` pairs into a right-padded batch with masked prompts.

    Returns:
        The batch (``input_ids``, ``attention_mask``, ``labels``) and token statistics.
    """
    if not pairs:
        raise ValueError(f"{config_key} has no records")
    prompts = tokenizer([prompt for prompt, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    responses = tokenizer([response for _, response in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    sequences, labels, truncated = [], [], 0
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        context = start + prompt
        target = response + end
        if len(context) + len(target) > max_length:
            truncated += 1
        ids = (context + target)[:max_length]
        label = ([IGNORE_INDEX] * len(context) + target)[:max_length]
        if all(token == IGNORE_INDEX for token in label):
            raise ValueError(
                f"{config_key} record {index}: its prompt alone has {len(context)} tokens, so data.max_length="
                f"{max_length} leaves no response token to train or score on; raise data.max_length"
            )
        sequences.append(ids)
        labels.append(label)
    if truncated:
        log.warning("%s: %d of %d sequences were longer than data.max_length=%d and were cut",
                    config_key, truncated, len(pairs), max_length)
    batch = _pad(sequences, labels, pad_token_id(tokenizer))
    lengths = batch["attention_mask"].sum(dim=1)
    stats = {
        "num_sequences": len(pairs),
        "mean_length": round(float(lengths.double().mean()), 1),
        "max_length": int(lengths.max()),
        "loss_tokens": int((batch["labels"] != IGNORE_INDEX).sum()),
        "truncated": truncated,
    }
    return batch, stats


def _pad(sequences: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, label) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        label_ids[row, : len(label)] = torch.tensor(label)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def _records(spec: Mapping, key: str, fields: Sequence[str], count: int | None, count_key: str) -> list[dict]:
    """Load the first ``count`` records of the dataset described by ``spec`` and check ``fields``."""
    spec = dict(spec)
    unknown = set(spec) - {"name", "config", "split", "path"}
    if unknown:
        raise ValueError(f"{key} has unknown keys {sorted(unknown)}; known: name, config, split, path")
    if spec.get("path") is None and not spec.get("name"):
        raise ValueError(f"{key} needs a Hub id ({key}.name) or a local copy ({key}.path)")
    dataset = load_split(
        spec.get("name") or "", spec.get("config"), spec.get("split") or "train", spec.get("path"),
        path_key=f"{key}.path", embedded_hint=SFT_HINT,
    )
    missing = [field for field in fields if field not in dataset.column_names]
    if missing:
        raise ValueError(f"{key} records lack the fields {missing}; found {dataset.column_names}")
    if count is not None:
        if count < 1:
            raise ValueError(f"{count_key}={count} must be at least 1")
        if count > len(dataset):
            raise ValueError(f"{count_key}={count} exceeds the {len(dataset)} records of {key}; lower it")
        dataset = dataset.select(range(count))
    return [dict(record) for record in dataset]


def _describe(spec: Mapping, fallback: str) -> str:
    return str(spec.get("path") or spec.get("name") or fallback)
