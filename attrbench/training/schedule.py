"""Batch order and learning-rate schedules, both fixed before training starts.

Every step's batch and learning rate are decided up front and stored in the trajectory, so
replay, leave-one-out retraining and the influence sweeps read the same values the real run used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class BatchSchedule:
    """Which samples each step uses.

    Attributes:
        indices: ``[T, max_batch]`` sample indices, padded with -1 where a batch is shorter.
        sizes: ``[T]`` number of samples in each batch.
    """

    indices: torch.Tensor
    sizes: torch.Tensor

    @classmethod
    def shuffled(cls, num_samples: int, batch_size: int, epochs: int, seed: int) -> BatchSchedule:
        """Shuffle the samples anew each epoch (generator seeded by ``seed``) and cut batches.

        The last batch of an epoch keeps the remainder (no samples are dropped), so 4,500
        samples in batches of 64 give 71 steps per epoch, the last with 20 samples.
        """
        if batch_size < 1 or epochs < 1 or num_samples < 1:
            raise ValueError(
                f"train.batch_size={batch_size}, train.epochs={epochs} and {num_samples} training "
                "samples must all be at least 1"
            )
        generator = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(epochs):
            order = torch.randperm(num_samples, generator=generator)
            batches += list(torch.split(order, batch_size))
        return cls.from_batches(batches)

    @classmethod
    def from_batches(cls, batches: list[torch.Tensor]) -> BatchSchedule:
        width = max(len(b) for b in batches)
        indices = torch.full((len(batches), width), -1, dtype=torch.long)
        for row, batch in enumerate(batches):
            indices[row, : len(batch)] = batch
        sizes = torch.tensor([len(b) for b in batches], dtype=torch.long)
        return cls(indices, sizes)

    @property
    def num_steps(self) -> int:
        return len(self.sizes)

    def batch(self, step: int) -> torch.Tensor:
        """Sample indices of step ``step`` (1-based: step 1 is the first update)."""
        return self.indices[step - 1, : int(self.sizes[step - 1])]

    def first_steps(self, samples: torch.Tensor) -> torch.Tensor:
        """1-based first step at which each sample appears (``num_steps + 1`` if never)."""
        first = torch.full((len(samples),), self.num_steps + 1, dtype=torch.long)
        for position, sample in enumerate(samples.tolist()):
            hits = (self.indices == sample).any(dim=1).nonzero()
            if len(hits):
                first[position] = int(hits[0]) + 1
        return first


def learning_rates(name: str, base_lr: float, num_steps: int, warmup_ratio: float = 0.0) -> list[float]:
    """Learning rate of each step 1..T.

    ``constant``: ``base_lr`` throughout. ``linear``: linear warmup over
    ``W = ceil(warmup_ratio * T)`` steps, then linear decay to zero, the same values as
    ``transformers.get_linear_schedule_with_warmup`` with the scheduler stepped after each
    update: step ``s = 1..T`` uses ``base_lr * f(s - 1)`` with ``f(k) = k / W`` for ``k < W`` and
    ``f(k) = (T - k) / (T - W)`` after, so with warmup the first update has learning rate 0.
    ``cosine``: the same warmup, then half a cosine from ``base_lr`` to zero.
    """
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"schedule.warmup_ratio={warmup_ratio} must lie in [0, 1]")
    warmup = math.ceil(warmup_ratio * num_steps)

    def factor(k: int) -> float:
        if k < warmup:
            return k / max(1, warmup)
        progress = (k - warmup) / max(1, num_steps - warmup)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    if name == "constant":
        return [float(base_lr)] * num_steps
    if name not in ("linear", "cosine"):
        raise ValueError(f"schedule.name={name!r} is not one of constant, linear, cosine")
    return [base_lr * factor(k) for k in range(num_steps)]
