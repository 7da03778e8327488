"""The real torch optimizers on a flat parameter vector, and their state as plain tensors.

Training, replay and leave-one-out retraining all step through :func:`optimizer_step` with an
optimizer built by :func:`build_optimizer`, so a replayed step is the same computation as the
recorded one, bit for bit. The optimizer is any ``torch.optim`` class named by the config's
``_target_``; its hyperparameters come from the config, never from constants here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import get_class

SUPPORTED = ("torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD")


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer class and its constructor arguments (without ``lr``, which is per step)."""

    target: str
    kwargs: dict

    @classmethod
    def from_config(cls, config: dict) -> OptimizerSpec:
        """Build from the ``optimizer`` config node (``_target_`` plus constructor arguments)."""
        config = dict(config)
        target = config.pop("_target_", None)
        if target not in SUPPORTED:
            raise ValueError(
                f"optimizer._target_={target!r} is not supported; use one of {', '.join(SUPPORTED)}"
            )
        config.pop("lr", None)
        kwargs = {key: (tuple(value) if isinstance(value, list) else value) for key, value in config.items()}
        spec = cls(target, kwargs)
        spec.validate()
        return spec

    @property
    def name(self) -> str:
        return self.target.rsplit(".", 1)[-1]

    def validate(self) -> None:
        """Reject settings whose update the influence recurrences do not model."""
        unsupported = {
            "amsgrad": False,
            "maximize": False,
            "nesterov": False,
            "momentum": 0,
            "dampening": 0,
        }
        for key, allowed in unsupported.items():
            if key in self.kwargs and self.kwargs[key] != allowed:
                raise ValueError(
                    f"optimizer.{key}={self.kwargs[key]!r} is not supported by the influence "
                    f"recurrences; set optimizer.{key}={allowed}"
                )
        if self.name == "Adam" and self.kwargs.get("weight_decay", 0) not in (0, 0.0):
            raise ValueError(
                "torch.optim.Adam with weight_decay adds L2 decay to the gradient, which "
                "AdamW-influence does not model; use optimizer=adamw (decoupled decay) instead"
            )

    def build(self, theta: torch.Tensor | list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        """Construct the optimizer over ``theta``: one tensor, or a list of tensors in one group.

        Without ``fused`` in the config this is torch's per-op implementation
        (``foreach=False``), whose elementwise results do not depend on where an entry sits in
        memory: row m of a stack of models ([M, P]) is bit-identical to a single model ([P]).
        The shipped configs set ``fused: true``, the one-pass kernel, which is faster on large
        stacks but rounds differently by position (differences near 1e-16 relative). Training,
        replay and retraining always use the same choice.
        """
        kwargs = dict(self.kwargs)
        if not kwargs.get("fused"):
            kwargs.setdefault("foreach", False)
        params = list(theta) if isinstance(theta, (list, tuple)) else [theta]
        return get_class(self.target)(params, lr=lr, **kwargs)

    def hyperparameters(self) -> dict:
        """Return the constructor arguments with torch's defaults filled in, as in ``param_groups``."""
        probe = torch.zeros(1, requires_grad=True)
        group = self.build(probe, lr=1.0).param_groups[0]
        return {key: value for key, value in group.items() if key not in ("params", "lr")}

    def to_json(self) -> dict:
        return {"_target_": self.target, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs.items()}}

    @classmethod
    def from_json(cls, data: dict) -> OptimizerSpec:
        return cls.from_config(data)


def read_state(optimizer: torch.optim.Optimizer, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copy ``theta`` and the optimizer's state for it into a flat dict of tensors.

    A non-tensor state entry becomes a 0-d float64 tensor. An optimizer that has not stepped yet,
    or one without state such as plain SGD, contributes only ``theta``.
    """
    state = {"theta": theta.detach().clone()}
    for key, value in optimizer.state.get(theta, {}).items():
        if torch.is_tensor(value):
            state[key] = value.detach().clone()
        elif value is not None:
            state[key] = torch.tensor(float(value), dtype=torch.float64)
    return state


def load_state(optimizer: torch.optim.Optimizer, theta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    """Set ``theta`` and the optimizer's state from a dict made by :func:`read_state`.

    A stored state of fewer dimensions than ``theta`` (one model) is broadcast to every row of a
    stacked ``theta`` (many models).
    """
    with torch.no_grad():
        theta.copy_(state["theta"].to(theta.dtype).expand_as(theta))
    optimizer.state[theta] = {}
    for key, value in state.items():
        if key == "theta":
            continue
        if key == "step":
            optimizer.state[theta][key] = step_tensor(optimizer, theta, value)
        else:
            optimizer.state[theta][key] = value.to(theta.dtype).expand_as(theta).clone()


def step_tensor(optimizer: torch.optim.Optimizer, theta: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The step counter as torch creates it: float32, on the parameter's device for fused kernels.

    The counter is a whole number well below 2**24, so float32 represents it exactly.
    """
    device = theta.device if optimizer.defaults.get("fused") else torch.device("cpu")
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    theta: torch.Tensor | list[torch.Tensor],
    gradient: torch.Tensor | list[torch.Tensor],
    lr: float,
) -> None:
    """Take one optimizer step on ``theta`` with the given gradient and learning rate.

    ``theta`` and ``gradient`` are one tensor each, or lists of matching tensors. With a fused
    optimizer each gradient must have its parameter's memory layout: torch's fused CPU kernels read
    a gradient's storage in order, so a transposed gradient would silently update the wrong
    entries. That case raises instead.
    """
    params = theta if isinstance(theta, (list, tuple)) else [theta]
    gradients = gradient if isinstance(gradient, (list, tuple)) else [gradient]
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    for param, value in zip(params, gradients, strict=True):
        same_layout = value.stride() == param.stride() or (value.is_contiguous() and param.is_contiguous())
        if value.shape != param.shape or (fused and not same_layout):
            raise ValueError(
                f"gradient of shape {tuple(value.shape)} and strides {value.stride()} does not match its "
                f"parameter's shape {tuple(param.shape)} and strides {param.stride()}; pass .contiguous() gradients"
            )
        param.grad = value
    optimizer.step()
    for param in params:
        param.grad = None
