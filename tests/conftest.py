"""Shared tiny problems and tolerances.

Exactness tests run in float64 on problems small enough that autograd through the whole
unrolled run is cheap: a 5-16-... MLP is not needed, a 6-4-3 ReLU MLP on 23 samples suffices.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from attrbench.models.mlp import MLP
from attrbench.tasks import Task, classification_loss
from attrbench.training.optim import OptimizerSpec
from attrbench.training.schedule import BatchSchedule, learning_rates

# Tests never contact the Hugging Face Hub and never read a developer's cache. The Hugging Face
# libraries read these variables on first import, which happens later, in the test modules.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="attrbench-test-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

# Relative tolerance for "equals the exact derivative" in float64.
EXACT_RTOL = 1e-8


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest entrywise error, relative to the largest entry of ``expected``."""
    return float((actual - expected).abs().max() / expected.abs().max())


def make_tiny_data(num_train: int = 23, num_test: int = 4, num_features: int = 6, seed: int = 0):
    """Random classification data whose last input feature is always zero."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_train + num_test, num_features, generator=generator, dtype=torch.float64)
    x[:, -1] = 0.0
    y = torch.randint(0, 3, (num_train + num_test,), generator=generator)
    train = {"x": x[:num_train], "y": y[:num_train]}
    test = {"x": x[num_train:], "y": y[num_train:]}
    return train, test


def make_tiny_task(num_features: int = 6, seed: int = 0) -> Task:
    torch.manual_seed(seed)
    model = MLP(num_features, (4,), 3).to(torch.float64)
    return Task(model, classification_loss)


@pytest.fixture(params=[False, True], ids=["per_op", "fused"])
def tiny_problem(request):
    """A multi-epoch AdamW run with weight decay, warmup-then-linear schedule and a dead feature.

    It runs once with torch's per-op AdamW and once with its fused kernel (the shipped default).
    """
    train, test = make_tiny_data()
    task = make_tiny_task()
    batches = BatchSchedule.shuffled(num_samples=23, batch_size=5, epochs=3, seed=1)
    lrs = learning_rates("linear", 0.05, batches.num_steps, warmup_ratio=0.2)
    optimizer = OptimizerSpec.from_config(
        {"_target_": "torch.optim.AdamW", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
         "fused": request.param}
    )
    return task, train, test, batches, lrs, optimizer
