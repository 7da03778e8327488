"""Trajectory-specific leave-one-out (TSLOO) retraining, many counterfactuals at once.

A counterfactual run repeats the recorded run exactly (initialization, batch order, learning
rates, optimizer) except that one training sample j is removed from every batch containing it.
Two removal semantics are supported:

* ``keep_denominator``: the batch loss stays ``sum_{i != j} l_i / |B|`` (the sample's weight goes
  from 1 to 0, which is what the first-order influence derivative describes);
* ``renormalize``: the batch loss becomes the mean over the remaining ``|B| - 1`` samples (what
  plain retraining without the sample does). A batch that loses its only sample contributes a
  zero gradient.

M counterfactuals are trained together as a stack, one ``[M, *shape]`` tensor per model
parameter, with the real torch optimizer. Its update is elementwise, so each row is an
independent run. The batch gradients of all rows come from one call of
:meth:`Task.stacked_gradient` with a per-row sample-weight mask: a single stacked forward and
backward pass for MLPs, a ``vmap`` over the rows for other models. Row 0 of every stack is the
unmodified run, trained by the same kernels, and ``delta = F(row j) - F(row 0)``, so
batched-versus-unbatched rounding cancels.

A stack starts at the latest stored checkpoint before any of its samples is first used, and each
counterfactual row joins the stack at its own sample's first step, so no step that would only
repeat the recorded run is computed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from attrbench.tasks import Batch, Task, select
from attrbench.training.optim import optimizer_step, step_tensor
from attrbench.training.trajectory import Trajectory

log = logging.getLogger(__name__)

REMOVALS = ("keep_denominator", "renormalize")


class GroundTruthDivergedError(FloatingPointError):
    """A counterfactual run's training loss became NaN or infinite."""


def check_removal(removal: str) -> None:
    if removal not in REMOVALS:
        raise ValueError(f"groundtruth.removal={removal!r} is not one of {', '.join(REMOVALS)}")


def leave_one_out(
    task: Task,
    train_data: Batch,
    test_data: Batch,
    trajectory: Trajectory,
    samples: torch.Tensor,
    removal: str = "keep_denominator",
    chunk_size: int = 32,
    progress: bool = True,
    on_chunk: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Retrain without each sample and return ``delta[test, sample]``.

    Args:
        samples: Indices of the training samples to remove, one counterfactual each.
        removal: ``"keep_denominator"`` or ``"renormalize"`` (see the module docstring).
        chunk_size: Counterfactual runs trained together (memory grows linearly with it).
        on_chunk: Called with ``(sample_positions, delta_chunk)`` after every chunk, so a caller
            can checkpoint finished work.

    Returns:
        ``[num_test, len(samples)]`` change of each test loss caused by removing each sample.
    """
    check_removal(removal)
    if chunk_size < 1:
        raise ValueError(f"groundtruth.chunk_size={chunk_size} must be at least 1")
    first_steps = trajectory.batches.first_steps(samples)
    order = torch.argsort(first_steps, stable=True)
    delta = torch.empty(len(next(iter(test_data.values()))), len(samples), dtype=trajectory.dtype)

    chunks = list(torch.split(order, chunk_size))
    for positions in tqdm(chunks, desc="leave-one-out", disable=not progress, leave=False):
        start = trajectory.checkpoint_at_or_before(int(first_steps[positions].min()) - 1)
        chunk_delta = retrain_without(
            task, train_data, test_data, trajectory, samples[positions], removal, start, device
        )
        delta[:, positions] = chunk_delta.cpu()
        if on_chunk is not None:
            on_chunk(positions, chunk_delta.cpu())
    return delta


def retrain_without(
    task: Task,
    train_data: Batch,
    test_data: Batch,
    trajectory: Trajectory,
    removed: torch.Tensor,
    removal: str,
    start: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Train one stack from checkpoint ``start``: row 0 unmodified, one row without each sample.

    A counterfactual row joins the stack at the first step whose batch contains its sample, as a
    copy of row 0 (parameters and optimizer state): before that step it would equal row 0. The
    stack therefore does exactly the work that differs from the recorded run.

    Returns:
        ``[num_test, len(removed)]`` test-loss differences against row 0 (zero for a sample that
        no batch after ``start`` contains).

    Raises:
        ValueError: If a sample is first used at or before ``start``.
    """
    first_steps = trajectory.batches.first_steps(removed.cpu())
    if (first_steps <= start).any():
        raise ValueError(f"checkpoint {start} is after the first use of a removed sample; start earlier")
    stack = _ModelStack(trajectory, trajectory.state(start, device), capacity=len(removed) + 1)
    removed = removed.to(device)
    rows: list[int] = []  # position in ``removed`` of stack rows 1, 2, ...

    for step in range(start + 1, trajectory.num_steps + 1):
        joining = (first_steps == step).nonzero().flatten().tolist()
        if joining:
            stack.add_copies_of_first_row(len(joining))
            rows += joining
        batch_index = trajectory.batches.batch(step).to(device)
        weights = _removal_weights(batch_index, removed[rows], stack.dtype)
        denominators = _denominators(weights, removal)
        with torch.no_grad():
            gradients, losses = task.stacked_gradient(stack.named_parameters(), select(train_data, batch_index),
                                                      weights, denominators)
        _check_finite(losses, weights, step, removed[rows])
        stack.step([gradients[name] for name in trajectory.layout.names], trajectory.lrs[step - 1])

    test_losses = task.stacked_losses(stack.named_parameters(), test_data)
    delta = torch.zeros(test_losses.shape[1], len(removed), dtype=test_losses.dtype, device=test_losses.device)
    delta[:, rows] = (test_losses[1:] - test_losses[0]).T
    return delta


class _ModelStack:
    """A stack of models trained by one torch optimizer, with room to add rows.

    Every model parameter (in the trajectory's layout) and every optimizer-state tensor of it
    lives in its own buffer of ``capacity`` rows, ``[capacity, *shape]``. The optimizer's
    parameters are the views of the first ``size`` rows, and their state tensors are views of
    the same rows, so the optimizer updates the buffers in place. Adding rows copies row 0 into
    the next free rows and rebuilds the optimizer over the longer views; nothing else moves.
    Keeping one tensor per parameter, rather than one flat vector per model, means the per-layer
    gradients reach the optimizer without being concatenated at every step.
    """

    def __init__(self, trajectory: Trajectory, state: dict[str, torch.Tensor], capacity: int):
        self.trajectory = trajectory
        self.layout = trajectory.layout
        self.capacity = capacity
        self.buffers: dict[str, list[torch.Tensor]] = {}
        for key, value in state.items():
            if value.dim() > 0:
                pieces = torch.split(value, self.layout.numels)
                self.buffers[key] = [piece.new_empty((capacity, *shape))
                                     for piece, shape in zip(pieces, self.layout.shapes)]
                for buffer, piece in zip(self.buffers[key], pieces):
                    buffer[0] = piece.view(buffer.shape[1:])
        self.size = 1
        self._build(state.get("step"))

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in zip(self.layout.names, self.params)}

    def step(self, gradients: list[torch.Tensor], lr: float) -> None:
        optimizer_step(self.optimizer, self.params, gradients, lr)

    def add_copies_of_first_row(self, count: int) -> None:
        first_state = self.optimizer.state[self.params[0]]
        for key, value in first_state.items():  # state the optimizer created at its first step
            if key not in self.buffers and torch.is_tensor(value) and value.dim() > 0:
                self.buffers[key] = []
                for param in self.params:
                    current = self.optimizer.state[param][key]
                    buffer = current.new_empty((self.capacity, *current.shape[1:]))
                    buffer[: self.size] = current
                    self.buffers[key].append(buffer)
        step_counter = first_state.get("step")
        for pieces in self.buffers.values():
            for buffer in pieces:
                buffer[self.size : self.size + count] = buffer[0]
        self.size += count
        self._build(step_counter)

    def _build(self, step_counter: torch.Tensor | None) -> None:
        self.params = [buffer[: self.size].detach().requires_grad_(True) for buffer in self.buffers["theta"]]
        self.optimizer = self.trajectory.optimizer.build(self.params, lr=0.0)
        for index, param in enumerate(self.params):
            state = self.optimizer.state[param]
            for key, pieces in self.buffers.items():
                if key != "theta":
                    state[key] = pieces[index][: self.size]
            if step_counter is not None:  # each parameter needs its own counter: steps increment it in place
                state["step"] = step_tensor(self.optimizer, param, step_counter)


def _removal_weights(batch_index: torch.Tensor, removed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[M + 1, B]`` weights: row 0 all ones, row m+1 zero where the batch contains ``removed[m]``."""
    keep = batch_index.unsqueeze(0) != removed.unsqueeze(1)
    ones = torch.ones(1, len(batch_index), dtype=torch.bool, device=batch_index.device)
    return torch.cat([ones, keep]).to(dtype)


def _denominators(weights: torch.Tensor, removal: str) -> torch.Tensor:
    if removal == "keep_denominator":
        return torch.full((len(weights),), float(weights.shape[1]), dtype=weights.dtype, device=weights.device)
    return weights.sum(dim=1).clamp(min=1.0)


def _check_finite(losses: torch.Tensor, weights: torch.Tensor, step: int, removed: torch.Tensor) -> None:
    finite = torch.isfinite(losses).all(dim=1)
    if finite.all():
        return
    row = int((~finite).nonzero()[0])
    which = "the unmodified run" if row == 0 else f"the run without training sample {int(removed[row - 1])}"
    raise GroundTruthDivergedError(
        f"training loss is not finite at step {step} in {which}. Lower optimizer.lr, use dtype=float64, "
        "or, if the trajectory is stored in a narrower dtype than training, set trajectory.storage_dtype=null"
    )
