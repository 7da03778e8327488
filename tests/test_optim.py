"""The AdamW replica, schedules and optimizer configuration against torch and transformers."""

from __future__ import annotations

import pytest
import torch

from attrbench.influence.adamw import adamw_update
from attrbench.training.optim import OptimizerSpec, load_state, optimizer_step, read_state
from attrbench.training.schedule import BatchSchedule, learning_rates


@pytest.mark.parametrize("fused", [False, True], ids=["per_op", "fused"])
def test_adamw_replica_matches_torch_over_many_steps(fused):
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(50, dtype=torch.float64, generator=generator)
    theta[:5] = 0.0
    lrs = learning_rates("linear", 1e-2, 200, warmup_ratio=0.1)
    hyper = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    parameter = theta.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([parameter], lr=lrs[0], fused=fused, **hyper)
    replica = (theta.clone(), torch.zeros_like(theta), torch.zeros_like(theta))

    for step, lr in enumerate(lrs, start=1):
        gradient = torch.randn(50, dtype=torch.float64, generator=generator)
        gradient[:5] = 0.0  # coordinates whose second moment stays zero
        optimizer_step(optimizer, parameter, gradient, lr)
        replica = adamw_update(*replica, gradient, step, lr, hyper["betas"], hyper["eps"], hyper["weight_decay"])

    state = optimizer.state[parameter]
    assert torch.allclose(replica[0], parameter.detach(), rtol=1e-13, atol=1e-15)
    assert torch.allclose(replica[1], state["exp_avg"], rtol=1e-13, atol=1e-15)
    assert torch.allclose(replica[2], state["exp_avg_sq"], rtol=1e-13, atol=1e-15)


def test_linear_schedule_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    steps, warmup_ratio, base = 48, 0.1, 1e-4
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=base)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(torch.tensor(steps * warmup_ratio).ceil()), steps)
    expected = []
    for _ in range(steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert learning_rates("linear", base, steps, warmup_ratio) == pytest.approx(expected, rel=1e-12, abs=0)


def test_cosine_and_constant_schedules():
    cosine = learning_rates("cosine", 1.0, 10, warmup_ratio=0.0)
    assert cosine[0] == 1.0
    assert cosine[-1] > 0
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert learning_rates("constant", 0.5, 3) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="schedule.name='step'"):
        learning_rates("step", 1.0, 3)


def test_batch_schedule_covers_each_epoch():
    batches = BatchSchedule.shuffled(num_samples=4500, batch_size=64, epochs=2, seed=0)
    assert batches.num_steps == 142
    assert batches.sizes[70] == 20
    first_epoch = torch.cat([batches.batch(step) for step in range(1, 72)])
    assert torch.equal(first_epoch.sort().values, torch.arange(4500))
    assert batches.first_steps(torch.tensor([int(batches.batch(5)[0])])).tolist() == [5]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"_target_": "torch.optim.RMSprop"}, "not supported"),
        ({"_target_": "torch.optim.AdamW", "amsgrad": True}, "optimizer.amsgrad=True"),
        ({"_target_": "torch.optim.SGD", "momentum": 0.9}, "optimizer.momentum=0.9"),
        ({"_target_": "torch.optim.Adam", "weight_decay": 0.1}, "decoupled"),
    ],
)
def test_optimizer_spec_rejects_unsupported(config, message):
    with pytest.raises(ValueError, match=message):
        OptimizerSpec.from_config(config)


def test_state_round_trip_and_broadcast():
    spec = OptimizerSpec.from_config({"_target_": "torch.optim.AdamW", "betas": [0.9, 0.95]})
    theta = torch.randn(7, dtype=torch.float64, requires_grad=True)
    optimizer = spec.build(theta, lr=0.1)
    for _ in range(3):
        optimizer_step(optimizer, theta, torch.randn(7, dtype=torch.float64), 0.1)
    state = read_state(optimizer, theta)

    stacked = torch.zeros(3, 7, dtype=torch.float64, requires_grad=True)
    stacked_optimizer = spec.build(stacked, lr=0.1)
    load_state(stacked_optimizer, stacked, state)
    gradient = torch.randn(7, dtype=torch.float64)
    optimizer_step(optimizer, theta, gradient, 0.1)
    optimizer_step(stacked_optimizer, stacked, gradient.expand(3, 7), 0.1)
    for row in range(3):
        assert torch.equal(stacked[row].detach(), theta.detach())


def test_list_of_parameters_steps_like_one_flat_vector():
    """The leave-one-out stack keeps one tensor per layer, and its update equals the flat one."""
    spec = OptimizerSpec.from_config({"_target_": "torch.optim.AdamW", "betas": [0.9, 0.95], "weight_decay": 0.1})
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(10, dtype=torch.float64, generator=generator, requires_grad=True)
    pieces = [flat.detach()[:6].clone().view(2, 3).requires_grad_(True), flat.detach()[6:].clone().requires_grad_(True)]
    flat_optimizer, pieces_optimizer = spec.build(flat, lr=0.0), spec.build(pieces, lr=0.0)
    for lr in (0.1, 0.05, 0.02):
        gradient = torch.randn(10, dtype=torch.float64, generator=generator)
        optimizer_step(flat_optimizer, flat, gradient, lr)
        optimizer_step(pieces_optimizer, pieces, [gradient[:6].view(2, 3), gradient[6:]], lr)
    assert torch.equal(torch.cat([pieces[0].detach().flatten(), pieces[1].detach()]), flat.detach())


def test_fused_step_rejects_a_gradient_in_another_layout():
    """torch's fused CPU AdamW reads a transposed gradient in storage order, updating wrong entries."""
    spec = OptimizerSpec.from_config({"_target_": "torch.optim.AdamW", "fused": True})
    theta = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    optimizer = spec.build(theta, lr=0.0)
    transposed = torch.randn(4, 3, dtype=torch.float64).T
    with pytest.raises(ValueError, match="strides"):
        optimizer_step(optimizer, theta, transposed, 0.1)
    optimizer_step(optimizer, theta, transposed.contiguous(), 0.1)
