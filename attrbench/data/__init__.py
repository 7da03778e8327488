"""Datasets: loaders return train and test splits as dictionaries of tensors."""

from attrbench.data.splits import DataSplits

__all__ = ["DataSplits"]
