"""Tokenizers: a pretrained one from the Hub or a local copy, or the embedded byte-level BPE.

A tokenizer is described by a spec (the ``tokenizer`` node of a model config, which the data
config reuses), so that the data and the model always agree on the vocabulary:

* ``name: embedded_bpe`` with ``vocab_size: V``: a byte-level BPE tokenizer trained by the
  ``tokenizers`` library on the English text of CPython's bundled documentation
  (:func:`pydoc_documents`). Training takes well under a second and is deterministic, so the
  tokenizer is rebuilt on each run instead of being stored.
* any other ``name``: ``AutoTokenizer.from_pretrained(path or name)``, from the Hub or its cache.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from attrbench.data.hub import unavailable_error

log = logging.getLogger(__name__)

EMBEDDED_BPE = "embedded_bpe"
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerSpec:
    """Description of the tokenizer to load.

    Attributes:
        name: ``embedded_bpe`` or a Hugging Face Hub id such as ``gpt2``.
        path: Local directory with the tokenizer files; replaces ``name`` for loading.
        vocab_size: Vocabulary size of the embedded BPE tokenizer (ignored otherwise).
        gated: Whether the Hub repository needs an accepted license (changes the error message).
        embedded_hint: Overrides that select the setting's offline variant, for error messages.
    """

    name: str
    path: str | None = None
    vocab_size: int | None = None
    gated: bool = False
    embedded_hint: str | None = None

    @classmethod
    def from_config(cls, spec: Mapping | TokenizerSpec) -> TokenizerSpec:
        if isinstance(spec, TokenizerSpec):
            return spec
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"model.tokenizer has unknown keys {sorted(unknown)}; "
                f"known keys: {', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**dict(spec))


def pydoc_documents() -> dict[str, str]:
    """CPython's bundled documentation topics (``pydoc_data.topics``), sorted by topic name.

    These are about 80 English texts from the Python language reference (about 465,000
    characters in Python 3.11); their exact content changes with the Python version.
    """
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def load_tokenizer(spec: Mapping | TokenizerSpec):
    """Return the tokenizer described by ``spec`` (cached per spec within a process).

    Raises:
        SourceUnavailableError: A pretrained tokenizer is neither reachable nor cached.
        ValueError: On an invalid spec.
    """
    return _load_tokenizer(TokenizerSpec.from_config(spec))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(spec: TokenizerSpec):
    if spec.name == EMBEDDED_BPE:
        if spec.vocab_size is None:
            raise ValueError("model.tokenizer.vocab_size must be set for the embedded_bpe tokenizer")
        return train_embedded_tokenizer(spec.vocab_size)
    from transformers import AutoTokenizer

    source = spec.path or spec.name
    if spec.path is not None and not Path(spec.path).expanduser().is_dir():
        raise FileNotFoundError(f"model.path={spec.path!r} is not a directory with the tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        if spec.path is not None:
            raise
        raise unavailable_error("tokenizer", spec.name, error, "model.path", spec.embedded_hint, spec.gated) from error
    log.info("tokenizer %s: %d tokens", source, len(tokenizer))
    return tokenizer


def train_embedded_tokenizer(vocab_size: int):
    """Train the embedded byte-level BPE tokenizer with ``vocab_size`` tokens on the pydoc text.

    The only special token is ``<|endoftext|>`` (GPT-2's), which serves as beginning-of-text,
    end-of-text and padding token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"model.tokenizer.vocab_size={vocab_size} is too small: a byte-level tokenizer needs "
            f"{len(alphabet)} byte tokens plus {END_OF_TEXT}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(list(pydoc_documents().values()), trainer=trainer)
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the pydoc text supports at most {backend.get_vocab_size()} BPE tokens; "
            f"lower model.tokenizer.vocab_size={vocab_size}"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def pad_token_id(tokenizer) -> int:
    """Return the padding id: the tokenizer's own, else its end-of-text id (padding is never attended)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a padding nor an end-of-text token")
