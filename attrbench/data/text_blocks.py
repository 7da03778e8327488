"""Fixed-length token blocks for continual pretraining: WikiText-2, or CPython's documentation.

A split's text is tokenized in order (without special tokens), the token ids are concatenated,
and the stream is cut into consecutive blocks of ``block_size`` tokens. The loaders keep the
first ``num_train`` training blocks and the first ``num_test`` validation blocks. Every token of a block is a
loss token, so a block's loss is the mean next-token loss over its last ``block_size - 1`` tokens.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from attrbench.data.hub import load_split
from attrbench.data.splits import DataSplits
from attrbench.data.tokenization import load_tokenizer, pydoc_documents

log = logging.getLogger(__name__)

WIKITEXT_RAW_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
WIKITEXT_HINT = "data=embedded_text model=tiny_gpt2"
LINES_PER_CALL = 1000


def load_wikitext2(
    tokenizer: Mapping,
    name: str = "Salesforce/wikitext",
    config: str = "wikitext-2-raw-v1",
    path: str | None = None,
    block_size: int = 128,
    num_train: int = 512,
    num_test: int = 256,
    seed: int = 0,
) -> DataSplits:
    """WikiText-2 blocks: training blocks from the train split, test blocks from validation.

    Args:
        tokenizer: Tokenizer spec (the model config's ``tokenizer`` node).
        name: Hub id of WikiText.
        config: Hub configuration; ``wikitext-2-raw-v1`` is the untokenized text.
        path: Local copy instead of the Hub: a directory with the raw release files
            ``wiki.train.raw`` and ``wiki.valid.raw``, a ``save_to_disk`` directory, or a
            downloaded copy of the Hub repository.
        block_size: Tokens per block.
        num_train: Training blocks, taken from the start of the train split.
        num_test: Test blocks (one test function each), from the start of the validation split.
        seed: Unused; blocks are taken in corpus order. Accepted because every loader gets one.

    Raises:
        SourceUnavailableError: WikiText is neither reachable nor cached and ``path`` is unset.
    """
    del seed
    _check_sizes(block_size=block_size, num_train=num_train, num_test=num_test)
    text_tokenizer = load_tokenizer(tokenizer)
    splits = {}
    for role, split, count in (("train", "train", num_train), ("test", "validation", num_test)):
        dataset = _wikitext_split(name, config, split, path)
        lines = (batch["text"] for batch in dataset.iter(batch_size=LINES_PER_CALL))
        stream = _token_stream(text_tokenizer, lines)
        splits[role] = _cut_blocks(stream, block_size, count, f"WikiText {split} split", role)
    source = f"wikitext ({config})" if path is None else f"wikitext ({path})"
    return _as_splits(splits, source, {"variant": "full", "block_size": block_size, "dataset": name,
                                       "config": config, "path": path})


def load_embedded_text(
    tokenizer: Mapping,
    block_size: int = 32,
    num_train: int = 128,
    num_test: int = 32,
    validation_every: int = 5,
    seed: int = 0,
) -> DataSplits:
    """Blocks of CPython's bundled documentation, which ships with every Python installation.

    The topics are sorted by name. Every ``validation_every``-th topic (the 5th, 10th, ...) is a
    validation document and the others are training documents, so test blocks come from texts
    the model never trains on. Documents are joined with the tokenizer's end-of-text token.

    Args:
        tokenizer: Tokenizer spec (the model config's ``tokenizer`` node).
        block_size: Tokens per block.
        num_train: Training blocks, from the start of the training documents.
        num_test: Test blocks, from the start of the validation documents.
        validation_every: Every this-many-th topic goes to validation.
        seed: Unused; blocks are taken in order.
    """
    del seed
    _check_sizes(block_size=block_size, num_train=num_train, num_test=num_test, validation_every=validation_every)
    text_tokenizer = load_tokenizer(tokenizer)
    documents = list(pydoc_documents().values())
    groups = {
        "train": [text for index, text in enumerate(documents) if (index + 1) % validation_every],
        "test": [text for index, text in enumerate(documents) if (index + 1) % validation_every == 0],
    }
    splits = {}
    for role, count in (("train", num_train), ("test", num_test)):
        stream = _token_stream(text_tokenizer, [[text] for text in groups[role]], separator=text_tokenizer.eos_token_id)
        splits[role] = _cut_blocks(stream, block_size, count, f"pydoc {role} documents", role)
    info = {"variant": "embedded", "block_size": block_size, "python": platform.python_version(),
            "num_documents": {role: len(texts) for role, texts in groups.items()}}
    return _as_splits(splits, "pydoc", info)


def _check_sizes(**sizes: int) -> None:
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"data.{key}={value!r} must be a whole number")
        # A block's loss predicts each token from the ones before it, so it needs two tokens.
        minimum = 2 if key == "block_size" else 1
        if value < minimum:
            raise ValueError(f"data.{key}={value} must be at least {minimum}")


def _wikitext_split(name: str, config: str, split: str, path: str | None):
    raw_file = Path(path).expanduser() / WIKITEXT_RAW_FILES[split] if path is not None else None
    location = str(raw_file) if raw_file is not None and raw_file.is_file() else path
    dataset = load_split(name, config, split, location, path_key="data.path", embedded_hint=WIKITEXT_HINT)
    if "text" not in dataset.column_names:
        raise ValueError(f"the WikiText {split} split has columns {dataset.column_names}, expected 'text'")
    return dataset


def _token_stream(tokenizer, text_batches: Iterable[list[str]], separator: int | None = None) -> Iterator[int]:
    """Token ids of the texts in order, ``separator`` between consecutive batches if given."""
    for position, texts in enumerate(text_batches):
        if separator is not None and position > 0:
            yield separator
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            yield from ids


def _cut_blocks(stream: Iterator[int], block_size: int, count: int, description: str, role: str) -> torch.Tensor:
    needed = block_size * count
    tokens = []
    for token in stream:
        tokens.append(token)
        if len(tokens) == needed:
            break
    if len(tokens) < needed:
        key = "num_train" if role == "train" else "num_test"
        raise ValueError(
            f"data.{key}={count} blocks of {block_size} tokens need {needed} tokens, but the {description} "
            f"give only {len(tokens)}; lower data.{key} or data.block_size"
        )
    return torch.tensor(tokens, dtype=torch.long).view(count, block_size)


def _as_splits(blocks: dict[str, torch.Tensor], source: str, info: dict) -> DataSplits:
    def text_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    log.info("%s: %d training and %d test blocks of %d tokens", source, len(blocks["train"]),
             len(blocks["test"]), blocks["train"].shape[1])
    return DataSplits(text_batch(blocks["train"]), text_batch(blocks["test"]), source, info)
