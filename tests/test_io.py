"""Atomic writes keep the permissions a plain open() would give."""

from __future__ import annotations

import os

import torch

from attrbench.io import load_tensors, save_tensors, write_json, write_text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_written_files_follow_umask(tmp_path):
    expected = 0o666 & ~_umask()
    write_json(tmp_path / "a.json", {"x": 1})
    write_text(tmp_path / "b.txt", "text")
    save_tensors(tmp_path / "c.safetensors", {"t": torch.zeros(2)})
    for name in ("a.json", "b.txt", "c.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name


def test_no_temporary_files_left(tmp_path):
    save_tensors(tmp_path / "c.safetensors", {"t": torch.arange(3.0)})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.safetensors"]
    assert torch.equal(load_tensors(tmp_path / "c.safetensors")["t"], torch.arange(3.0))
