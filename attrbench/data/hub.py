"""Hugging Face datasets from the Hub, its offline cache, or a local copy, with one clear error.

Every loader here honours the usual Hugging Face switches. With network access a dataset is
downloaded once and cached under ``HF_HOME``. With ``HF_HUB_OFFLINE=1`` or
``HF_DATASETS_OFFLINE=1`` only the cache is read. A local path replaces the Hub entirely. When
neither works the loaders raise :class:`SourceUnavailableError`, whose message names the source
and the ways to make it available.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# File suffixes that the `datasets` packaged builders read directly; a file is one split.
FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".raw": "text",
    ".arrow": "arrow",
}
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")

AUTHENTICATION_HINT = (
    "{source} is a gated repository: accept its license on its Hugging Face page while logged in, "
    "then authenticate with `huggingface-cli login` (or `hf auth login`), or set the HF_TOKEN "
    "environment variable to an access token"
)


class SourceUnavailableError(OSError):
    """A dataset, tokenizer or model could be loaded neither from the Hub nor from disk."""


def unavailable_error(
    kind: str,
    source: str,
    error: Exception,
    path_key: str,
    embedded_hint: str | None = None,
    gated: bool = False,
) -> SourceUnavailableError:
    """Build the error for a source that could not be loaded.

    Args:
        kind: What failed to load, for example ``"dataset"`` or ``"model"``.
        source: The Hub id that was requested.
        error: The underlying exception, quoted in the message.
        path_key: The config key that points the loader at a local copy instead.
        embedded_hint: Overrides that select the offline variant of the setting, if any.
        gated: Whether the Hub repository needs an accepted license and a token.
    """
    lines = [
        f"could not load the {kind} {source!r} from the Hugging Face Hub or its local cache "
        f"({type(error).__name__}: {error}).",
        "Either run once with network access (the download is cached and later runs work offline), "
        f"or set {path_key} to a local copy.",
    ]
    if gated:
        lines.append(AUTHENTICATION_HINT.format(source=source) + ".")
    if embedded_hint:
        lines.append(f"To run without any download, use the embedded variant: {embedded_hint}.")
    return SourceUnavailableError(" ".join(lines))


def load_split(
    name: str,
    config: str | None,
    split: str,
    path: str | None = None,
    *,
    path_key: str,
    embedded_hint: str | None = None,
    cache_dir: str | None = None,
):
    """Load one split of a dataset as a ``datasets.Dataset``.

    Args:
        name: Hub id, for example ``"tatsu-lab/alpaca"``.
        config: Hub configuration name, or None.
        split: Split to return, for example ``"train"``.
        path: Local replacement for the Hub: a data file (JSON, JSON Lines, Parquet, CSV, text;
            the file is the split), a directory written by ``save_to_disk``, or a directory
            holding a downloaded copy of the Hub repository.
        path_key: Config key of ``path``, named in error messages.
        embedded_hint: Overrides that select the offline variant, named in error messages.
        cache_dir: Cache directory for ``datasets``; None uses its default under ``HF_HOME``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SourceUnavailableError: The Hub id could not be loaded.
    """
    import datasets

    if path is None:
        try:
            return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
        except (OSError, datasets.exceptions.DatasetNotFoundError) as error:
            raise unavailable_error("dataset", name, error, path_key, embedded_hint) from error
    return load_local_split(path, config, split, path_key=path_key, cache_dir=cache_dir)


def load_local_split(path: str, config: str | None, split: str, *, path_key: str, cache_dir: str | None = None):
    """Load ``split`` from a local file or directory (see :func:`load_split`)."""
    import datasets

    local = Path(path).expanduser()
    if not local.exists():
        raise FileNotFoundError(f"{path_key}={path!r} does not exist; point it at a local copy of the dataset")
    log.info("loading %s split from local copy %s", split, local)
    if local.is_file():
        builder = FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{path_key}={path!r} has suffix {local.suffix!r}; supported data files are "
                f"{', '.join(sorted(FILE_BUILDERS))}"
            )
        options = {"keep_linebreaks": True} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=str(local), split="train", cache_dir=cache_dir, **options)
    if any((local / marker).exists() for marker in SAVED_DATASET_MARKERS):
        saved = datasets.load_from_disk(str(local))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"{path_key}={path!r} has splits {list(saved)} but not {split!r}")
            return saved[split]
        return saved
    return datasets.load_dataset(str(local), config, split=split, cache_dir=cache_dir)
