"""The validation split that data selection scores against.

Selection must never see the test set, so it scores samples by their effect on a separate
validation loss. :func:`split_validation` moves a random subset of the training split into a
validation split (drawn with its own seed). The loaders already draw train and test disjointly,
so validation and test are disjoint too, and the test split stays the one ``attrbench run``
uses. Every loader has a training split, so this works for any dataset. The cost is that
selection runs train on ``num_validation`` fewer samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attrbench.data import DataSplits
from attrbench.tasks import Batch, num_samples, select


@dataclass
class SelectionData:
    """Training, validation and test splits of a selection run.

    Attributes:
        train: Samples the selection may drop. Indices in schedules and scores refer to these.
        validation: Samples whose mean loss the look-ahead scores predict.
        test: Held-out samples for the final test loss and accuracy, never used by selection.
        validation_index: Positions of the validation samples in the loader's training split.
        source: The loader's data source.
    """

    train: Batch
    validation: Batch
    test: Batch
    validation_index: torch.Tensor
    source: str

    @property
    def num_train(self) -> int:
        return num_samples(self.train)


def split_validation(data: DataSplits, num_validation: int, seed: int) -> SelectionData:
    """Move ``num_validation`` randomly chosen training samples into a validation split.

    Args:
        data: The loader's splits.
        num_validation: Size of the validation split.
        seed: Seed of the random choice.

    Raises:
        ValueError: If ``num_validation`` is below 1 or leaves fewer than 2 training samples.
    """
    if num_validation < 1 or num_validation > data.num_train - 2:
        raise ValueError(
            f"selection.num_validation={num_validation} must lie between 1 and {data.num_train - 2} "
            f"(the {data.num_train} training samples minus 2); change selection.num_validation "
            "or data.num_train"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.num_train, generator=generator)
    validation_index = order[:num_validation].sort().values
    train_index = order[num_validation:].sort().values
    device = next(iter(data.train.values())).device
    return SelectionData(
        train=select(data.train, train_index.to(device)),
        validation=select(data.train, validation_index.to(device)),
        test=data.test,
        validation_index=validation_index,
        source=data.source,
    )
