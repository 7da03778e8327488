"""Atomic file writes and checksums for stage outputs.

torch and safetensors.torch are imported inside the tensor functions, so that the torch-free
commands (``attrbench report``, ``attrbench figures``) can write files through this module
without paying for a torch import.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Metadata for Matplotlib's savefig. By default Matplotlib (3.11.2) writes the current time into
# a PDF's CreationDate, so a figure redrawn from unchanged tables would differ from the committed
# file. PNGs carry no date, and their bytes are the same with or without this argument.
FIGURE_METADATA = {"CreationDate": None}


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    return Path(temporary)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _replace(temporary: Path, path: Path) -> None:
    try:
        # mkstemp (and safetensors, which writes the file anew) leave it readable by its owner
        # only; give it the permissions that open() would.
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data) -> None:
    """Write JSON to a temporary file in the same directory, then rename it over ``path``."""
    path = Path(path)
    temporary = _atomic_target(path)
    try:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _replace(temporary, path)


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    temporary = _atomic_target(path)
    try:
        temporary.write_text(text)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _replace(temporary, path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically; return the file's SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    temporary = _atomic_target(path)
    try:
        contiguous = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
        save_file(contiguous, str(temporary), metadata=metadata)
        digest = sha256(temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _replace(temporary, path)
    return digest


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
