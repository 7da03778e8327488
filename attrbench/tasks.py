"""A training task: model, functional per-sample loss, and the gradient passes built on them.

Data are dictionaries of tensors whose first dimension indexes samples (``{"x": ..., "y": ...}``
for images, ``{"input_ids": ..., "labels": ...}`` for text). A :class:`Task` evaluates the
per-sample losses of a batch at a flat parameter vector ``theta`` through
``torch.func.functional_call``, so every pass below composes with ``vmap``, ``grad`` and ``jvp``.

The batch loss of step t is ``L_t(theta; w) = sum_i w_i l_i(theta) / denominator``. In the real run
all weights are 1 and the denominator is the batch size; leave-one-out retraining and
derivatives with respect to a sample's weight change ``w``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from attrbench.models.stacked import stacked_forward, supports_stacking
from attrbench.params import ParameterLayout

Batch = dict[str, torch.Tensor]
PerSampleLoss = Callable[[nn.Module, dict[str, torch.Tensor], Batch], torch.Tensor]


def select(data: Batch, index: torch.Tensor) -> Batch:
    """Return the rows ``index`` of every tensor in ``data``."""
    return {key: value[index] for key, value in data.items()}


def fingerprint(*datasets: Batch) -> str:
    """SHA-256 of the datasets' tensors (keys, dtypes, shapes and values), in order."""
    digest = hashlib.sha256()
    for data in datasets:
        for key in sorted(data):
            value = data[key].detach().contiguous().cpu()
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def num_samples(data: Batch) -> int:
    return len(next(iter(data.values())))


def classification_loss(model: nn.Module, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """Per-sample cross-entropy of a classifier on ``batch["x"]`` with labels ``batch["y"]``."""
    logits = functional_call(model, params, (batch["x"],))
    return F.cross_entropy(logits, batch["y"], reduction="none")


def _stacked_classification_loss(model: nn.Module, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """:func:`classification_loss` of M models at once: ``params`` entries ``[M, ...]``, result ``[M, B]``."""
    logits = stacked_forward(model, params, batch["x"])
    copies, size, _ = logits.shape
    # -log softmax(logits)[label] = logsumexp(logits) - logits[label]; over [M, B, classes] this is
    # faster than F.cross_entropy on [M * B, classes] and agrees with it to rounding.
    labels = batch["y"].view(1, size, 1).expand(copies, size, 1)
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, labels).squeeze(-1)


# Per-sample losses with a form that evaluates a stack of models without vmap (see
# attrbench.models.stacked); a loss not listed here is stacked with vmap.
STACKED_LOSSES = {classification_loss: _stacked_classification_loss}


class Task:
    """A model template plus its per-sample loss, evaluated at flat parameter vectors.

    Args:
        model: The module whose parameters ``theta`` replaces; its own parameters are the
            initialization.
        loss: ``loss(model, params_and_buffers, batch) -> Tensor[B]``.
        micro_batch_size: If set, gradient passes split each batch into pieces of this many
            samples and sum the pieces (gradient accumulation). The sums are taken in a fixed
            order, so training and replay stay bit-identical.
    """

    def __init__(self, model: nn.Module, loss: PerSampleLoss, micro_batch_size: int | None = None):
        self.model = model
        self.loss = loss
        self.layout = ParameterLayout.from_module(model)
        self.buffers = dict(model.named_buffers())
        self.micro_batch_size = micro_batch_size
        self._stacked_loss = STACKED_LOSSES.get(loss) if supports_stacking(model) else None

    @property
    def stacks_without_vmap(self) -> bool:
        """Whether :meth:`stacked_gradient` uses the stacked forward pass instead of ``vmap``."""
        return self._stacked_loss is not None

    @property
    def num_parameters(self) -> int:
        return self.layout.numel

    def initial_parameters(self) -> torch.Tensor:
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        return self.layout.flatten(params).clone()

    def per_sample_loss(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        params = self.layout.unflatten(theta)
        return self.loss(self.model, {**params, **self.buffers}, batch)

    def weighted_loss(
        self, theta: torch.Tensor, batch: Batch, weights: torch.Tensor, denominator: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(sum_i w_i l_i / denominator, per-sample losses)``."""
        losses = self.per_sample_loss(theta, batch)
        return (losses * weights).sum() / denominator, losses

    def _micro_batches(self, size: int) -> list[slice]:
        step = self.micro_batch_size or size
        return [slice(start, min(start + step, size)) for start in range(0, size, step)]

    def batch_gradient(
        self, theta: torch.Tensor, batch: Batch, weights: torch.Tensor, denominator: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the gradient of the weighted batch loss and the per-sample losses.

        Works under ``vmap`` over a stack of models (``theta``, ``weights`` and ``denominator``
        batched), which is how leave-one-out retraining runs many counterfactuals at once.
        """
        gradient_fn = grad(self.weighted_loss, has_aux=True)
        total, losses = None, []
        for part in self._micro_batches(len(weights)):
            g, part_losses = gradient_fn(theta, select(batch, part), weights[part], denominator)
            total = g if total is None else total + g
            losses.append(part_losses)
        return total, torch.cat(losses)

    def stacked_gradient(
        self, params: dict[str, torch.Tensor], batch: Batch, weights: torch.Tensor, denominators: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return the batch gradients of M models on one shared batch, and their per-sample losses.

        Row m is :meth:`batch_gradient` at the parameters ``params[.][m]`` with weights
        ``weights[m]`` and denominator ``denominators[m]``, kept per parameter tensor instead of as
        one flat vector. Models that :func:`~attrbench.models.stacked.supports_stacking` accepts
        run as one stacked forward pass with a reverse-mode backward through it; all others run
        under ``vmap``. The tests check both against a loop of :meth:`batch_gradient` calls.

        Args:
            params: Parameters by layout name, each ``[M, *shape]``.
            batch: The batch of ``B`` samples, shared by all models.
            weights: ``[M, B]`` sample weights.
            denominators: ``[M]`` divisors of the weighted loss sums.

        Returns:
            ``(gradients, losses)``: gradients by name, each ``[M, *shape]`` and contiguous, and
            the ``[M, B]`` per-sample losses.
        """
        part_gradient = self._stacked_part_gradient if self.stacks_without_vmap else self._vmapped_part_gradient
        total, losses = None, []
        for part in self._micro_batches(weights.shape[1]):
            gradients, part_losses = part_gradient(params, select(batch, part), weights[:, part], denominators)
            total = gradients if total is None else {name: total[name] + gradients[name] for name in total}
            losses.append(part_losses)
        return {name: value.contiguous() for name, value in total.items()}, torch.cat(losses, dim=1)

    def _stacked_part_gradient(self, params, batch, weights, denominators):
        with torch.enable_grad():
            leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
            losses = self._stacked_loss(self.model, leaves, batch)
            # Row m's parameters reach only row m's losses, so the gradient of the sum over rows
            # is every row's own gradient.
            total = ((losses * weights).sum(dim=1) / denominators).sum()
            gradients = torch.autograd.grad(total, list(leaves.values()))
        return dict(zip(leaves, gradients)), losses.detach()

    def _vmapped_part_gradient(self, params, batch, weights, denominators):
        def weighted_loss(one_model, one_weights, denominator):
            losses = self.loss(self.model, {**one_model, **self.buffers}, batch)
            return (losses * one_weights).sum() / denominator, losses

        return vmap(grad(weighted_loss, has_aux=True))(params, weights, denominators)

    def stacked_losses(self, params: dict[str, torch.Tensor], data: Batch, chunk_size: int = 1024) -> torch.Tensor:
        """Return the ``[M, N]`` per-sample losses of M models (``params`` as in :meth:`stacked_gradient`)."""
        if self.stacks_without_vmap:
            def losses_of(part):
                return self._stacked_loss(self.model, params, part)
        else:
            def losses_of(part):
                return vmap(lambda one: self.loss(self.model, {**one, **self.buffers}, part))(params)
        size = num_samples(data)
        with torch.no_grad():
            parts = [losses_of(select(data, slice(start, start + chunk_size))) for start in range(0, size, chunk_size)]
        return torch.cat(parts, dim=1)

    def hvp_and_sample_dots(
        self, theta: torch.Tensor, batch: Batch, directions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``H u`` and ``<grad l_i, u>`` for each direction ``u`` in ``directions``.

        ``H`` is the Hessian of the mean batch loss (all weights 1, denominator the batch size)
        at ``theta``. Both come from one forward-over-reverse pass per micro-batch: the ``jvp`` of
        ``theta -> (grad L, per-sample losses)`` in direction ``u``. Its tangent outputs are the
        Hessian-vector product and the per-sample directional derivatives, so no per-sample
        gradient is ever materialised. ``vmap`` runs all directions through one pass.

        Args:
            theta: Parameters, shape ``[P]``.
            batch: The step's batch of ``B`` samples.
            directions: Shape ``[Q, P]``.

        Returns:
            ``(Hu [Q, P], dots [Q, B])``.
        """
        size = num_samples(batch)
        weights = torch.ones(size, dtype=theta.dtype, device=theta.device)
        gradient_fn = grad(self.weighted_loss, has_aux=True)
        hvp_total, dots = None, []
        for part in self._micro_batches(size):
            part_batch, part_weights = select(batch, part), weights[part]

            def pass_for(direction, part_batch=part_batch, part_weights=part_weights):
                def gradient_and_losses(th):
                    return gradient_fn(th, part_batch, part_weights, size)

                _, (hvp, sample_dots) = jvp(gradient_and_losses, (theta,), (direction,))
                return hvp, sample_dots

            hvp, part_dots = vmap(pass_for)(directions)
            hvp_total = hvp if hvp_total is None else hvp_total + hvp
            dots.append(part_dots)
        return hvp_total, torch.cat(dots, dim=1)

    def sample_gradients(self, theta: torch.Tensor, data: Batch) -> torch.Tensor:
        """Return per-sample loss gradients ``[N, P]`` (for test functions, which are few)."""

        def single_loss(th, sample):
            batch = {key: value.unsqueeze(0) for key, value in sample.items()}
            return self.per_sample_loss(th, batch).squeeze(0)

        return vmap(grad(single_loss), in_dims=(None, 0))(theta, data)

    def evaluate_losses(self, theta: torch.Tensor, data: Batch, chunk_size: int = 1024) -> torch.Tensor:
        """Return the per-sample losses of ``data`` at ``theta`` without building a graph."""
        size = num_samples(data)
        with torch.no_grad():
            parts = [
                self.per_sample_loss(theta, select(data, slice(start, start + chunk_size)))
                for start in range(0, size, chunk_size)
            ]
        return torch.cat(parts)
