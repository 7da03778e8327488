"""Benchmark the core stages on the default MNIST MLP problem, in one process.

Prints, on the same problem and machine:

* batched leave-one-out (stacks of counterfactual runs trained together, each run joining its
  stack at its sample's first step) against a plain loop that retrains one model per removed
  sample from scratch with the training step of ``attrbench`` (the functional gradient and the
  torch optimizer that recorded the run). A second loop starts each retrain at the last
  checkpoint before the sample's first use, which isolates the gain of batching alone. A third
  loop is the one a researcher would write by hand: an ``nn.Module``, ``loss.backward()`` and
  ``optimizer.step()``, from scratch. The batched path and the loops run in alternation
  (``--rounds``), so that a change of machine load during the run affects all alike;
* the cost of an SGD- and an AdamW-influence sweep over all test points, as a multiple of one
  training run.

Usage: python scripts/benchmark_core.py [--samples 200] [--dtype float64] [--chunk-size 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from attrbench.data.mnist import load_mnist
from attrbench.experiment import choose_samples, configure_torch, derive_seed
from attrbench.groundtruth.loo import leave_one_out
from attrbench.influence import build_method, compute_influence
from attrbench.models.mlp import MLP
from attrbench.tasks import Task, classification_loss, select
from attrbench.training.optim import OptimizerSpec, load_state, optimizer_step
from attrbench.training.schedule import BatchSchedule, learning_rates
from attrbench.training.trainer import train

# torch.func's vmap-over-jvp scripts a helper internally (torch 2.14), so the warning is not ours.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)


def looped_leave_one_out(task, data, trajectory, samples, warm_start: bool) -> torch.Tensor:
    """Retrain one model per removed sample in a plain loop (the baseline of batching)."""
    reference = task.evaluate_losses(trajectory.final_parameters(), data.test)
    columns = []
    first_steps = trajectory.batches.first_steps(samples)
    for sample, first in zip(samples.tolist(), first_steps.tolist()):
        start = trajectory.checkpoint_at_or_before(first - 1) if warm_start else 0
        state = trajectory.state(start)
        theta = state["theta"].clone().requires_grad_(True)
        optimizer = trajectory.optimizer.build(theta, lr=0.0)
        load_state(optimizer, theta, state)
        for step in range(start + 1, trajectory.num_steps + 1):
            index = trajectory.batches.batch(step)
            weights = (index != sample).to(theta.dtype)
            gradient, _ = task.batch_gradient(theta.detach(), select(data.train, index), weights, len(index))
            optimizer_step(optimizer, theta, gradient, trajectory.lrs[step - 1])
        columns.append(task.evaluate_losses(theta.detach(), data.test) - reference)
    return torch.stack(columns, dim=1)


def module_loop_leave_one_out(task, data, trajectory, samples) -> torch.Tensor:
    """Retrain one ``nn.Module`` per removed sample with ``loss.backward()``, from scratch."""
    model = MLP().to(trajectory.dtype)
    reference = task.evaluate_losses(trajectory.final_parameters(), data.test)
    initial = trajectory.state(0)["theta"]
    columns = []
    for sample in samples.tolist():
        # vector_to_parameters makes the parameters views of its argument: give it a copy, so
        # the optimizer does not write into the trajectory's initial state.
        torch.nn.utils.vector_to_parameters(initial.clone(), model.parameters())
        optimizer = trajectory.optimizer.build(list(model.parameters()), lr=0.0)
        for step in range(1, trajectory.num_steps + 1):
            index = trajectory.batches.batch(step)
            batch = select(data.train, index)
            weights = (index != sample).to(trajectory.dtype)
            loss = (F.cross_entropy(model(batch["x"]), batch["y"], reduction="none") * weights).sum() / len(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = trajectory.lrs[step - 1]
            optimizer.step()
        theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        columns.append(task.evaluate_losses(theta, data.test) - reference)
    return torch.stack(columns, dim=1)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def interleaved_leave_one_out(task, data, trajectory, samples, chunk_size: int, rounds: int):
    """Time batched and looped leave-one-out in alternation, so both see the same machine load.

    The removed samples are cut into ``rounds`` groups. Each round runs the batched path on all
    samples, then the three loops on the round's group. The batched time is the median over
    rounds (after one untimed warm-up run); each loop's time is its sum over the groups.
    """
    leave_one_out(task, data.train, data.test, trajectory, samples, chunk_size=chunk_size, progress=False)
    loops = {
        "checkpoint": lambda group: looped_leave_one_out(task, data, trajectory, group, warm_start=True),
        "scratch": lambda group: looped_leave_one_out(task, data, trajectory, group, warm_start=False),
        "module": lambda group: module_loop_leave_one_out(task, data, trajectory, group),
    }
    batched_times, loop_times = [], dict.fromkeys(loops, 0.0)
    columns = {name: [] for name in loops}
    for group in torch.tensor_split(torch.arange(len(samples)), rounds):
        batched, seconds = timed(leave_one_out, task, data.train, data.test, trajectory, samples,
                                 chunk_size=chunk_size, progress=False)
        batched_times.append(seconds)
        for name, loop in loops.items():
            looped, seconds = timed(loop, samples[group])
            loop_times[name] += seconds
            columns[name].append(looped)
    looped = {name: torch.cat(parts, dim=1) for name, parts in columns.items()}
    return batched, statistics.median(batched_times), looped, loop_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="removed training samples")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--chunk-size", type=int, default=100, help="counterfactual runs per stack")
    parser.add_argument("--query-chunk-size", type=int, default=100, help="test functions per sweep")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternations of batched and looped leave-one-out (batched time: median)")
    arguments = parser.parse_args()

    configure_torch(deterministic=True)
    dtype = getattr(torch, arguments.dtype)
    data = load_mnist(seed=derive_seed(0, "data")).to("cpu", dtype)
    torch.manual_seed(derive_seed(0, "init"))
    task = Task(MLP().to(dtype), classification_loss)
    batches = BatchSchedule.shuffled(data.num_train, 64, 1, derive_seed(0, "batches"))
    lrs = learning_rates("constant", 1e-3, batches.num_steps)
    optimizer = OptimizerSpec.from_config({"_target_": "torch.optim.AdamW", "betas": [0.9, 0.95], "fused": True})
    samples = choose_samples(data.num_train, arguments.samples, 0)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, {arguments.dtype}")
    print(f"problem: MNIST MLP, {data.num_train} train / {data.num_test} test, {batches.num_steps} steps, "
          f"{task.num_parameters} parameters, {arguments.samples} removed samples")

    train(task, data.train, batches, lrs, optimizer, progress=False)  # warm-up
    trajectory, train_seconds = timed(train, task, data.train, batches, lrs, optimizer, progress=False)
    print(f"training run: {train_seconds:.3f} s")

    batched, batched_seconds, looped, loop_seconds = interleaved_leave_one_out(
        task, data, trajectory, samples, arguments.chunk_size, arguments.rounds
    )
    path = "one stacked forward pass" if task.stacks_without_vmap else "vmap"
    print(f"leave-one-out, batched (stacks of {arguments.chunk_size}, {path}, "
          f"median of {arguments.rounds}): {batched_seconds:.2f} s")
    labels = {
        "checkpoint": "loop from the checkpoint",
        "scratch": "loop from scratch",
        "module": "nn.Module loop from scratch",
    }
    for name, label in labels.items():
        print(f"leave-one-out, {label + ':':<29}{loop_seconds[name]:6.2f} s  "
              f"(batched is {loop_seconds[name] / batched_seconds:.1f}x faster)")
    scale = looped["scratch"].abs().max()
    agreement = max(float((batched - looped[name]).abs().max() / scale) for name in labels)
    print(f"max relative difference batched vs loops: {agreement:.1e}")

    for name in ("sgd_influence", "adamw_influence"):
        _, seconds = timed(
            compute_influence, build_method(name), task, data.train, data.test, trajectory,
            query_chunk_size=arguments.query_chunk_size, progress=False,
        )
        print(f"{name} sweep, {data.num_test} test points: {seconds:.2f} s = "
              f"{seconds / train_seconds:.1f} training runs ({seconds / train_seconds / data.num_test:.3f} per test point)")


if __name__ == "__main__":
    main()
