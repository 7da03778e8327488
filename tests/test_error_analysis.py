"""The error proxy's parts against autograd references, and the error tables and figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.func import jacfwd

from attrbench.analysis.figures import draw_error_figures, grid_correlations, seed_summary
from attrbench.analysis.proxy import error_proxy, frozen_tangents, third_derivative
from attrbench.influence.adamw import adamw_update
from attrbench.influence.tangents import forward_records
from attrbench.tasks import select
from attrbench.training.trainer import train

from conftest import EXACT_RTOL, max_relative_error

SAMPLES = torch.tensor([4, 0, 22])


def _frozen_run(task, train_data, trajectory, sample, hyperparameters):
    """``theta_T`` of the frozen-gradient run as functions of alpha and of a later-gradient shift.

    Plain loop: every recorded gradient stays fixed, the sample's batches add
    ``alpha * (-grad l_j / |B|)``, and every step after the sample's first adds ``shift`` to all
    coordinates.
    """
    records = [record for _, record in forward_records(task, train_data, trajectory)]
    first_step = int(trajectory.batches.first_steps(torch.tensor([sample]))[0])
    own = {}
    for record in records:
        batch_index = trajectory.batches.batch(record.step)
        if (batch_index == sample).any():
            gradient = task.sample_gradients(record.theta_before, select(train_data, torch.tensor([sample])))[0]
            own[record.step] = -gradient / len(batch_index)

    def final_theta(alpha, shift):
        theta = trajectory.state(0)["theta"]
        exp_avg = torch.zeros_like(theta)
        exp_avg_sq = torch.zeros_like(theta)
        for record in records:
            gradient = record.gradient + alpha * own.get(record.step, torch.zeros_like(theta))
            if record.step > first_step:
                gradient = gradient + shift
            theta, exp_avg, exp_avg_sq = adamw_update(
                theta, exp_avg, exp_avg_sq, gradient, record.step, trajectory.lrs[record.step - 1],
                hyperparameters["betas"], hyperparameters["eps"], hyperparameters["weight_decay"],
            )
        return theta

    return final_theta


def test_frozen_tangents_equal_autograd(tiny_problem):
    task, train_data, _, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, checkpoint_every=4, progress=False)
    tangents, response = frozen_tangents(task, train_data, trajectory, SAMPLES, "keep_denominator", progress=False)

    zero = torch.zeros((), dtype=torch.float64)
    for row, sample in enumerate(SAMPLES.tolist()):
        final_theta = _frozen_run(task, train_data, trajectory, sample, optimizer.hyperparameters())
        first = jacfwd(lambda a: final_theta(a, zero))(zero)
        second = jacfwd(jacfwd(lambda a: final_theta(a, zero)))(zero)
        shift = jacfwd(lambda s: final_theta(zero, s))(zero)
        assert max_relative_error(tangents[1][row], first) < EXACT_RTOL
        assert max_relative_error(tangents[2][row], second) < EXACT_RTOL
        assert max_relative_error(response[row], shift) < EXACT_RTOL


def test_third_derivative_equals_reverse_mode(tiny_problem):
    task, train_data, _, _, _, _ = tiny_problem
    theta = task.initial_parameters()
    directions = torch.randn(2, task.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probe = third_derivative(task, train_data, theta, directions)

    for row, direction in enumerate(directions):
        point = theta.clone().requires_grad_(True)
        loss = task.per_sample_loss(point, train_data).mean()
        (gradient,) = torch.autograd.grad(loss, point, create_graph=True)
        (hessian_vector,) = torch.autograd.grad(gradient @ direction, point, create_graph=True)
        (expected,) = torch.autograd.grad(hessian_vector @ direction, point)
        assert max_relative_error(probe[row], expected) < EXACT_RTOL


def test_error_proxy_parts_are_finite(tiny_problem):
    task, train_data, test_data, batches, lrs, optimizer = tiny_problem
    trajectory = train(task, train_data, batches, lrs, optimizer, progress=False)
    for removal in ("keep_denominator", "renormalize"):
        proxy = error_proxy(task, train_data, test_data, trajectory, SAMPLES, removal,
                            curvature_batch_size=8, progress=False)
        assert proxy.total.shape == (4, 3)
        assert torch.isfinite(proxy.total).all()
        assert (proxy.perturbation_size > 0).all()
        assert (proxy.lr_length > 0).all()


def _summaries(tmp_path):
    rows = []
    for number, (lr, steps, seed) in enumerate(
        [(lr, steps, seed) for lr in (1e-2, 1e-3) for steps in (10, 20) for seed in (0, 1)]
    ):
        measured = lr * steps * (1 + 0.1 * seed)
        rows.append({"setting": "tiny", "lr": lr, "num_steps": steps, "seed": seed,
                     "measured_error": measured, "second_order_term": 0.5 * measured, "proxy": 2 * measured,
                     "spearman_first_order": 0.5, "spearman_second_order": 0.6})
        run_dir = tmp_path / "sweep" / str(number)
        run_dir.mkdir(parents=True)
        pd.DataFrame([rows[-1]]).to_csv(run_dir / "error_summary.csv", index=False)
        pd.DataFrame({"method": ["adamw_influence", "second_order"], "spearman_mean": [0.3 + seed, 0.4]}).to_csv(
            run_dir / "spearman.csv", index=False)
    return pd.DataFrame(rows)


def test_grid_correlations_rank_runs(tmp_path):
    summaries = _summaries(tmp_path)
    table = grid_correlations(summaries).set_index("predictor")
    assert table.loc["closed-form proxy", "spearman_across_runs"] == 1.0
    assert table.loc["closed-form proxy", "ratio_of_totals"] == 2.0
    assert table.loc["exact second-order term", "cells"] == 4


def test_draw_error_figures_reads_sweep(tmp_path):
    _summaries(tmp_path)
    paths = draw_error_figures(tmp_path / "sweep", tmp_path / "figures")
    for path in paths:
        assert path.is_file(), path
    grid = pd.read_csv(tmp_path / "figures" / "error_grid.csv")
    assert len(grid) == 4
    assert np.allclose(grid.seeds, 2)


def test_seed_summary_averages_runs(tmp_path):
    _summaries(tmp_path)
    table = seed_summary(tmp_path / "sweep").set_index("quantity")
    assert np.isclose(table.loc["Spearman, adamw_influence", "mean"], 0.8)
    assert np.isclose(table.loc["Spearman, second_order", "std"], 0.0)
    assert table.loc["measured_error", "runs"] == 8
