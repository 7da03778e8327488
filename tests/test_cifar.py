"""CIFAR-10 loading from files in the dataset's real on-disk format, and its error paths.

The fixture writes ``cifar-10-batches-py`` as the python version of CIFAR-10 ships it. Each batch
is a pickled dict (protocol 2) whose ``data`` is a uint8 array with one 3,072-value row per image
and whose ``labels`` is a list of ints. A row is the red, green and blue 32 x 32 planes in turn,
each row-major. ``batches.meta`` lists the class names. torchvision's CIFAR10 class checks each
file's MD5 against the real dataset's, so the tests replace those digests with the fixture's.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from attrbench.data.cifar import load_cifar10

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 4
NUM_TEST_FILE = 6


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path: Path, record: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(record, handle, protocol=2)


def write_cifar_fixture(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny CIFAR-10 in its real format under ``root``; return the rows and labels written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for number in range(1, 6):
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, 10, PER_BATCH).tolist()
        _dump(folder / f"data_batch_{number}", {
            "batch_label": f"training batch {number} of 5",
            "labels": batch_labels,
            "data": data,
            "filenames": [f"train_{number}_{index}.png" for index in range(PER_BATCH)],
        })
        rows.append(data)
        labels += batch_labels
    test_data = rng.integers(0, 256, (NUM_TEST_FILE, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, NUM_TEST_FILE).tolist()
    _dump(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1",
        "labels": test_labels,
        "data": test_data,
        "filenames": [f"test_{index}.png" for index in range(NUM_TEST_FILE)],
    })
    meta = {"num_cases_per_batch": PER_BATCH, "label_names": CLASSES, "num_vis": 3072}
    _dump(folder / "batches.meta", meta)
    return {"train_rows": np.concatenate(rows), "train_labels": np.array(labels),
            "test_rows": test_data, "test_labels": np.array(test_labels)}


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A fixture dataset under ``tmp_path`` whose MD5s torchvision accepts."""
    written = write_cifar_fixture(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{n}", _md5(folder / f"data_batch_{n}")]
                                                for n in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return tmp_path, written


def test_fixture_loads_through_torchvision(cifar_root):
    root, written = cifar_root
    splits = load_cifar10(root=str(root), num_train=12, num_test=4, seed=0)

    assert splits.info["variant"] == "full"
    assert splits.source == "torchvision"
    assert splits.image_shape == (3, 32, 32)
    assert splits.train["x"].shape == (12, 3, 32, 32)
    assert splits.test["x"].shape == (4, 3, 32, 32)
    assert splits.train["x"].is_contiguous()
    assert splits.test["x"].is_contiguous()
    assert splits.info["classes"] == CLASSES


def test_images_and_labels_match_the_files(cifar_root):
    root, written = cifar_root
    splits = load_cifar10(root=str(root), num_train=12, num_test=4, seed=0)
    mean = torch.tensor(splits.info["channel_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(splits.info["channel_std"]).view(1, 3, 1, 1)

    for split in ("train", "test"):
        rows, labels = f"{split}_rows", f"{split}_labels"
        index = np.array(splits.info[f"{split}_index"])
        # Each row contains the red, green and blue planes in turn, so it reshapes to [3, 32, 32].
        expected = torch.from_numpy(written[rows][index].reshape(-1, 3, 32, 32)).float() / 255.0
        restored = getattr(splits, split)["x"] * std + mean
        assert torch.allclose(restored, expected, atol=1e-6), split
        assert getattr(splits, split)["y"].tolist() == written[labels][index].tolist(), split


def test_train_subset_is_standardized(cifar_root):
    root, _ = cifar_root
    images = load_cifar10(root=str(root), num_train=20, num_test=2, seed=0).train["x"]
    assert torch.allclose(images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(images.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5)


def test_subsets_are_seeded(cifar_root):
    root, _ = cifar_root
    first = load_cifar10(root=str(root), num_train=8, num_test=3, seed=1)
    again = load_cifar10(root=str(root), num_train=8, num_test=3, seed=1)
    other = load_cifar10(root=str(root), num_train=8, num_test=3, seed=2)
    assert first.info["train_index"] == again.info["train_index"]
    assert first.info["train_index"] != other.info["train_index"]


def test_size_beyond_dataset_rejected(cifar_root):
    root, _ = cifar_root
    with pytest.raises(ValueError, match="data.num_train=21 exceeds the 20 CIFAR-10 images"):
        load_cifar10(root=str(root), num_train=21, num_test=2)


def _assert_names_ways_out(message: str) -> None:
    assert "CIFAR-10 not found" in message
    assert "data.download=true" in message
    assert "point data.root at a directory" in message
    assert "data=mnist" in message


def test_missing_files_name_the_ways_out(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(root=str(tmp_path))
    _assert_names_ways_out(str(error.value))
    assert str(tmp_path) in str(error.value)


def test_corrupt_file_names_the_ways_out(cifar_root):
    root, _ = cifar_root
    victim = root / "cifar-10-batches-py" / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:-5])
    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(root=str(root))
    _assert_names_ways_out(str(error.value))


def test_failed_download_names_the_ways_out(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise URLError("network is unreachable")

    # The download itself is replaced, so the test sends nothing over the network.
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", unreachable)
    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(root=str(tmp_path), download=True)
    _assert_names_ways_out(str(error.value))
    assert "network is unreachable" in str(error.value)


def test_null_root_rejected():
    with pytest.raises(ValueError, match="data.root is null"):
        load_cifar10(root=None)
