"""Trajectory influence methods: each predicts the leave-one-out change of every test loss.

SGD- and AdamW-influence are reverse (adjoint) sweeps over the recorded trajectory; they differ
in the adjoint recurrence of one optimizer step. ``second_order`` propagates forward tangents for
the attributed samples only. Register a new method in :data:`METHODS`.
"""

from __future__ import annotations

import torch

from attrbench.influence.adamw import AdamWInfluence
from attrbench.influence.base import (
    InfluenceMethod,
    InfluenceScores,
    SampleInfluenceMethod,
    compute_influence,
)
from attrbench.influence.second_order import SecondOrderInfluence, SecondOrderScores
from attrbench.influence.sgd import SGDInfluence

METHODS: dict[str, type[InfluenceMethod] | type[SampleInfluenceMethod]] = {
    SGDInfluence.name: SGDInfluence,
    AdamWInfluence.name: AdamWInfluence,
    SecondOrderInfluence.name: SecondOrderInfluence,
}


def build_method(name: str, **options) -> InfluenceMethod | SampleInfluenceMethod:
    if name not in METHODS:
        raise ValueError(f"influence method {name!r} is unknown; available: {', '.join(METHODS)}")
    return METHODS[name](**options)


def load_scores(tensors: dict[str, torch.Tensor]) -> InfluenceScores | SecondOrderScores:
    """Rebuild the scores that ``to_tensors()`` of either score class saved."""
    if "second_derivative" in tensors:
        return SecondOrderScores.from_tensors(tensors)
    return InfluenceScores(tensors["derivative"], tensors["renormalize_correction"])


__all__ = [
    "METHODS",
    "InfluenceMethod",
    "InfluenceScores",
    "SampleInfluenceMethod",
    "SecondOrderScores",
    "build_method",
    "compute_influence",
    "load_scores",
]
