"""CIFAR-10 through torchvision, as a seeded random subset.

torchvision's ``CIFAR10`` class reads the dataset's python version under ``root``:
``root/cifar-10-batches-py`` with the pickled batches ``data_batch_1`` .. ``data_batch_5``
(50,000 training images), ``test_batch`` (10,000 test images) and ``batches.meta`` (class names),
each checked against its MD5. It downloads the archive only when ``download`` is true.

Images are returned as ``[N, 3, 32, 32]`` tensors, scaled to [0, 1] and then standardized per
channel with the mean and standard deviation of the drawn training subset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from attrbench.data.splits import DataSplits

log = logging.getLogger(__name__)

FOLDER = "cifar-10-batches-py"
IMAGE_SHAPE = (3, 32, 32)


def load_cifar10(
    root: str | None = "data",
    download: bool = False,
    num_train: int = 5000,
    num_test: int = 500,
    seed: int = 0,
) -> DataSplits:
    """Load CIFAR-10 from ``root`` and draw the train and test subsets with ``seed``.

    Args:
        root: Directory that contains (or, with ``download``, will contain) ``cifar-10-batches-py``.
        download: Let torchvision download and unpack CIFAR-10 into ``root`` (needs network).
        num_train: Training images drawn from the 50,000.
        num_test: Test images drawn from the 10,000.
        seed: Seed of the random subsets.

    Raises:
        ValueError: If ``root`` is missing or a size is not positive or exceeds the dataset.
        FileNotFoundError: If the files are missing or corrupt and could not be downloaded.
    """
    if root is None:
        raise ValueError(
            "data.root is null; set it to the directory that contains (or will contain) "
            f"{FOLDER}, or run the embedded variant with data=mnist"
        )
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if value < 1:
            raise ValueError(f"data.{name}={value} must be at least 1")

    train_set, test_set = _open_torchvision(str(root), download)
    for name, requested, available in (
        ("num_train", num_train, len(train_set)),
        ("num_test", num_test, len(test_set)),
    ):
        if requested > available:
            raise ValueError(f"data.{name}={requested} exceeds the {available} CIFAR-10 images available")

    generator = torch.Generator().manual_seed(seed)
    train_index = torch.randperm(len(train_set), generator=generator)[:num_train]
    test_index = torch.randperm(len(test_set), generator=generator)[:num_test]
    train_x, test_x = _to_chw(train_set.data, train_index), _to_chw(test_set.data, test_index)
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True)
    train_targets, test_targets = torch.tensor(train_set.targets), torch.tensor(test_set.targets)

    log.info("CIFAR-10 from %s (%d train, %d test images)", root, num_train, num_test)
    return DataSplits(
        train={"x": (train_x - mean) / std, "y": train_targets[train_index]},
        test={"x": (test_x - mean) / std, "y": test_targets[test_index]},
        source="torchvision",
        info={
            "variant": "full",
            "root": str(root),
            "classes": list(train_set.classes),
            "channel_mean": mean.flatten().tolist(),
            "channel_std": std.flatten().tolist(),
            "train_index": train_index.tolist(),
            "test_index": test_index.tolist(),
        },
        image_shape=IMAGE_SHAPE,
    )


def _open_torchvision(root: str, download: bool):
    from torchvision.datasets import CIFAR10

    try:
        return CIFAR10(root, train=True, download=download), CIFAR10(root, train=False, download=download)
    except (RuntimeError, OSError) as error:
        # torchvision raises RuntimeError for missing or corrupt files; a failed download raises
        # an OSError (urllib's URLError is one).
        raise FileNotFoundError(
            f"CIFAR-10 not found under data.root={root!r}: torchvision expects "
            f"{Path(root) / FOLDER} with data_batch_1..5, test_batch and batches.meta ({error}). "
            "Either set data.download=true on a machine with network, or point data.root at a "
            f"directory that already holds {FOLDER}. To run offline on the embedded MNIST "
            "images instead, use data=mnist."
        ) from error


def _to_chw(images, index: torch.Tensor) -> torch.Tensor:
    """Select ``index`` from torchvision's uint8 ``[N, 32, 32, 3]`` array; return float ``[n, 3, 32, 32]``.

    The result is contiguous in NCHW order: a permuted view would keep channels-last strides, which
    every later elementwise operation and convolution would carry along.
    """
    selected = torch.from_numpy(images[index.numpy()])
    return (selected.permute(0, 3, 1, 2).to(torch.float32) / 255.0).contiguous()
