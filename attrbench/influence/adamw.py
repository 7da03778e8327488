"""AdamW-influence: the exact adjoint of torch.optim.AdamW's update.

One step of ``torch.optim.AdamW`` (amsgrad off) with learning rate eta, betas (b1, b2), eps and
decoupled weight decay lambda:

    theta' = theta_{t-1} (1 - eta lambda)
    m_t    = b1 m_{t-1} + (1 - b1) g_t
    v_t    = b2 v_{t-1} + (1 - b2) g_t^2
    theta_t = theta' - eta c1 m_t / (sqrt(c2 v_t) + eps),   c1 = 1/(1 - b1^t), c2 = 1/(1 - b2^t)

:func:`adamw_update` is this step as a pure function; the tests check it against torch.optim.AdamW.
With ``s = sqrt(c2 v_t)``, ``D = 1/(s + eps)`` and ``S = c1 c2 m_t / (2 s (s + eps)^2)``, the adjoint
step from (a_theta, a_m, a_v) after step t is

    mu    = a_m - eta c1 D a_theta                   (total adjoint of m_t)
    nu    = a_v + eta S a_theta                      (total adjoint of v_t)
    gamma = (1 - b1) mu + 2 (1 - b2) g_t nu          (adjoint of the batch gradient g_t)
    dF/dw_{i,t} = <gamma, grad l_i(theta_{t-1})> / |B_t|
    a_theta <- (1 - eta lambda) a_theta + H_t gamma ;  a_m <- b1 mu ;  a_v <- b2 nu

Where v_t = 0 the coordinate has never had a nonzero gradient (m_t = 0 too): S is set to 0 there
instead of evaluating 0 * inf.
"""

from __future__ import annotations

import torch

from attrbench.influence.base import HvpAndDots, InfluenceMethod
from attrbench.training.optim import OptimizerSpec
from attrbench.training.trainer import StepRecord


def adamw_update(
    theta: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    gradient: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step as a pure, differentiable function; returns ``(theta_t, m_t, v_t)``.

    ``step`` is the 1-based step count used in the bias corrections. The square root is guarded
    so that autograd through it gives 0, not NaN, where ``v_t = 0``.
    """
    beta1, beta2 = betas
    decayed = theta * (1.0 - lr * weight_decay)
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * gradient
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * gradient * gradient
    c1 = 1.0 / (1.0 - beta1**step)
    c2 = 1.0 / (1.0 - beta2**step)
    positive = exp_avg_sq > 0
    root = torch.where(positive, torch.sqrt(torch.where(positive, c2 * exp_avg_sq, 1.0)), 0.0)
    return decayed - lr * c1 * exp_avg / (root + eps), exp_avg, exp_avg_sq


class AdamWInfluence(InfluenceMethod):
    name = "adamw_influence"

    def check_optimizer(self, optimizer: OptimizerSpec) -> None:
        if optimizer.name not in ("AdamW", "Adam"):
            raise ValueError(
                f"adamw_influence needs a run trained with AdamW, but this run used {optimizer.target}; "
                "drop it from influence.methods or train with optimizer=adamw"
            )

    def initial_adjoint(self, test_gradients: torch.Tensor) -> dict[str, torch.Tensor]:
        zeros = torch.zeros_like(test_gradients)
        return {"theta": test_gradients.clone(), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}

    def backward_step(
        self, adjoint, record: StepRecord, lr: float, hyperparameters: dict, hvp_and_dots: HvpAndDots
    ):
        beta1, beta2 = hyperparameters["betas"]
        eps, weight_decay = hyperparameters["eps"], hyperparameters["weight_decay"]
        exp_avg, exp_avg_sq = record.state_after["exp_avg"], record.state_after["exp_avg_sq"]
        step = int(record.state_after["step"]) if "step" in record.state_after else record.step
        c1, c2 = 1.0 / (1.0 - beta1**step), 1.0 / (1.0 - beta2**step)

        root = torch.sqrt(c2 * exp_avg_sq)
        inverse = 1.0 / (root + eps)
        positive = root > 0
        safe_root = torch.where(positive, root, 1.0)
        sensitivity = torch.where(positive, c1 * c2 * exp_avg / (2.0 * safe_root * (root + eps) ** 2), 0.0)

        a_theta = adjoint["theta"]
        mu = adjoint["exp_avg"] - lr * c1 * inverse * a_theta
        nu = adjoint["exp_avg_sq"] + lr * sensitivity * a_theta
        gamma = (1.0 - beta1) * mu + 2.0 * (1.0 - beta2) * record.gradient * nu

        hvp, dots = hvp_and_dots(gamma)
        new_adjoint = {
            "theta": (1.0 - lr * weight_decay) * a_theta + hvp,
            "exp_avg": beta1 * mu,
            "exp_avg_sq": beta2 * nu,
        }
        return new_adjoint, dots / dots.shape[1]
