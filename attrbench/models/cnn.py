"""Small convolutional classifier for image settings (CIFAR-10, and MNIST as the offline variant)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvNet(nn.Module):
    """LeNet-5-style CNN: convolution blocks, then a fully connected ReLU head.

    Each block is an unpadded ``kernel_size`` x ``kernel_size`` convolution, 2x2 max-pooling and
    ReLU. Pooling runs before the ReLU: the two commute because ReLU is monotone, and this order
    applies ReLU to a quarter as many values. The network has no batch normalization or dropout,
    so each sample's loss depends on that sample alone, as per-sample weights require.

    With the defaults (channels 6 and 16, kernel 5, head 120-84-10) the model has 62,006
    parameters on CIFAR-10 images (3 x 32 x 32) and 44,426 on MNIST images (1 x 28 x 28).

    Args:
        input_shape: ``(channels, height, width)`` of one image. Inputs of any shape with that
            many values per sample (for example MNIST's flattened 784-value rows) are reshaped.
        channels: Output channels of each convolution block.
        kernel_size: Side of the square convolution kernels.
        hidden_dims: Widths of the hidden fully connected layers.
        num_classes: Number of output logits.

    Raises:
        ValueError: If ``input_shape`` is missing or the blocks shrink the image to nothing.
    """

    def __init__(
        self,
        input_shape: Sequence[int] | None,
        channels: Sequence[int] = (6, 16),
        kernel_size: int = 5,
        hidden_dims: Sequence[int] = (120, 84),
        num_classes: int = 10,
    ):
        super().__init__()
        if input_shape is None or len(input_shape) != 3:
            raise ValueError(
                f"model.input_shape={input_shape!r} must be [channels, height, width]; leave it null "
                "only with a dataset that reports its image shape"
            )
        self.input_shape = tuple(int(size) for size in input_shape)
        in_channels, height, width = self.input_shape

        layers: list[nn.Module] = []
        for out_channels in channels:
            height, width = (height - kernel_size + 1) // 2, (width - kernel_size + 1) // 2
            if height < 1 or width < 1:
                raise ValueError(
                    f"model.channels={list(channels)} with kernel_size={kernel_size} shrink "
                    f"{list(self.input_shape)} images to nothing; use fewer blocks or a smaller kernel"
                )
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size), nn.MaxPool2d(2), nn.ReLU()]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)

        head: list[nn.Module] = [nn.Flatten()]
        features = in_channels * height * width
        for hidden in hidden_dims:
            head += [nn.Linear(features, hidden), nn.ReLU()]
            features = hidden
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.reshape(-1, *self.input_shape)))
