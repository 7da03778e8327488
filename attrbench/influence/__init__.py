"""Trajectory influence methods: each predicts the leave-one-out change of every test loss.

Every method is a reverse (adjoint) sweep over the recorded trajectory; they differ in the
adjoint recurrence of one optimizer step. Register a new method in :data:`METHODS`.
"""

from attrbench.influence.adamw import AdamWInfluence
from attrbench.influence.base import InfluenceMethod, InfluenceScores, compute_influence
from attrbench.influence.sgd import SGDInfluence

METHODS: dict[str, type[InfluenceMethod]] = {
    SGDInfluence.name: SGDInfluence,
    AdamWInfluence.name: AdamWInfluence,
}


def build_method(name: str, **options) -> InfluenceMethod:
    if name not in METHODS:
        raise ValueError(f"influence method {name!r} is unknown; available: {', '.join(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "InfluenceMethod", "InfluenceScores", "build_method", "compute_influence"]
