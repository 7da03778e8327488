"""SGD-influence (Hara, Nitanda and Maehara, 2019).

For plain SGD, ``theta_t = (1 - eta_t lambda) theta_{t-1} - eta_t g_t`` with
``g_t = sum_i w_i grad l_i / |B_t|``. Its exact adjoint step is

    dF/dw_{i,t} = -(eta_t / |B_t|) <a_t, grad l_i(theta_{t-1})>
    a_{t-1}     = (1 - eta_t lambda) a_t - eta_t H_t a_t

(``lambda`` is SGD's L2 weight decay, or AdamW's decoupled decay, which has the same Jacobian).
On a run trained with AdamW this is the mismatched baseline: it ignores the moments and the
preconditioner.
"""

from __future__ import annotations

import torch

from attrbench.influence.base import HvpAndDots, InfluenceMethod
from attrbench.training.trainer import StepRecord


class SGDInfluence(InfluenceMethod):
    name = "sgd_influence"

    def initial_adjoint(self, test_gradients: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"theta": test_gradients.clone()}

    def backward_step(
        self, adjoint, record: StepRecord, lr: float, hyperparameters: dict, hvp_and_dots: HvpAndDots
    ):
        a_theta = adjoint["theta"]
        direction = -lr * a_theta
        hvp, dots = hvp_and_dots(direction)
        decay = 1.0 - lr * hyperparameters.get("weight_decay", 0.0)
        new_adjoint = {"theta": decay * a_theta + hvp}
        return new_adjoint, dots / dots.shape[1]
