"""Algorithm-level error of one run: measured first-order error, second-order term and proxy.

For every attributed sample j, averaged over the test losses q:

* measured error ``mean_q |delta_qj - F'_qj|``, where ``F'`` is the first-order estimate
  (AdamW-influence on AdamW runs, SGD-influence on SGD runs, both equal to ``F'(0)`` of the
  second-order method);
* second-order term ``mean_q |F''_qj / 2|`` from the exact second derivative;
* residual ``mean_q |delta_qj - F'_qj - F''_qj / 2|`` left by the second-order estimate;
* proxy ``mean_q |E_qj|`` from :mod:`attrbench.analysis.proxy`.

How well the second-order term and the proxy predict the measured error is their Spearman
correlation with it across samples and the ratio of their totals to its total.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from attrbench.analysis.proxy import ProxyTerms, error_proxy
from attrbench.evaluation.metrics import rowwise_correlations
from attrbench.evaluation.report import format_markdown
from attrbench.io import load_tensors, save_tensors, write_text
from attrbench.groundtruth.shards import samples_key
from attrbench.stages import open_stage
from attrbench.tasks import select

log = logging.getLogger(__name__)

SAMPLES_TABLE = "error_samples"
SUMMARY_TABLE = "error_summary"
# Part of the proxy's cache key: raise it whenever the proxy's definition changes.
PROXY_VERSION = 1


def run_error_analysis(experiment, trajectory, stages: dict, groundtruth, run_dir: Path) -> pd.DataFrame:
    """Compute the per-sample error table and the run summary and write both into ``run_dir``.

    Only the scored test functions (``evaluation.num_scored``) enter, as in the Spearman table.
    """
    from attrbench.pipeline import influence_for, num_scored

    scored = num_scored(experiment)
    delta = groundtruth.delta[:scored]
    scores = influence_for(experiment, trajectory, stages, "second_order")
    if not torch.equal(scores.samples, groundtruth.samples):
        raise RuntimeError("second_order scores cover other samples than the ground truth; clear the cache entry")
    proxy = proxy_for(experiment, trajectory, stages, scored)
    first_steps = trajectory.batches.first_steps(groundtruth.samples)
    per_sample = sample_errors(
        delta.numpy(), scores.first_derivative.numpy(), scores.second_order_term.numpy(), proxy,
        groundtruth.samples.numpy(), first_steps.numpy(),
    )
    cfg = experiment.config
    run = {
        "setting": cfg.setting.name,
        "optimizer": experiment.optimizer.name,
        "lr": float(cfg.optimizer.lr),
        "epochs": int(cfg.train.epochs),
        "num_steps": trajectory.num_steps,
        "seed": int(cfg.seed),
        "dtype": cfg.dtype,
        "removal": cfg.groundtruth.removal,
        "num_samples": len(groundtruth.samples),
        "num_test": int(delta.shape[0]),
        "second_order_seconds": stages["second_order"].record()["elapsed_seconds"],
        "proxy_seconds": stages["error_proxy"].record()["elapsed_seconds"],
    }
    summary = summarize_errors(
        delta.numpy(), scores.first_derivative.numpy(), scores.second_order_term.numpy(),
        proxy.total.numpy(), per_sample, run,
    )
    for table, stem in ((per_sample, SAMPLES_TABLE), (summary, SUMMARY_TABLE)):
        # Errors span orders of magnitude, so the Markdown tables use significant digits.
        write_text(run_dir / f"{stem}.csv", table.to_csv(index=False))
        write_text(run_dir / f"{stem}.md", format_markdown(table, floatfmt=".4g"))
    log.info(
        "error analysis: measured %.3g, second-order term %.3g (Spearman %.3f), proxy %.3g (Spearman %.3f)",
        summary.measured_error[0], summary.second_order_term[0], summary.spearman_error_second_order[0],
        summary.proxy[0], summary.spearman_error_proxy[0],
    )
    return summary


def proxy_for(experiment, trajectory, stages: dict, scored: int) -> ProxyTerms:
    """Load or compute the attributed samples' proxy terms, cached in a stage like the pipeline's.

    The stage is added to ``stages`` as ``error_proxy``.
    """
    from attrbench.pipeline import trajectory_sha256

    cfg = experiment.config
    options = cfg.analysis.get("proxy", {}) or {}
    batch_size = int(options.get("curvature_batch_size", 256))
    config = {
        "train": stages["train"].key,
        "trajectory": trajectory_sha256(trajectory),
        "samples": samples_key(experiment.samples),
        "removal": cfg.groundtruth.removal,
        "num_scored": scored,
        "curvature_batch_size": batch_size,
        "seed": int(cfg.seed),
        "version": PROXY_VERSION,
    }
    stage = stages["error_proxy"] = open_stage(cfg.cache_dir, "analysis/error_proxy", config)
    path = stage.directory / "proxy.safetensors"
    with stage.lock():
        if stage.is_complete():
            log.info("error proxy: reusing %s", path)
            stage.status = "reused"
            return ProxyTerms.from_tensors(load_tensors(path))

        stage.begin()
        proxy = error_proxy(
            experiment.task, experiment.data.train, select(experiment.data.test, slice(0, scored)), trajectory,
            experiment.samples, cfg.groundtruth.removal, batch_size, int(cfg.seed), experiment.device, cfg.progress,
        )
        digest = save_tensors(path, proxy.to_tensors())
        stage.complete({"proxy.safetensors": digest})
        stage.status = "computed"
        return proxy


def sample_errors(
    delta: np.ndarray,
    first: np.ndarray,
    second_term: np.ndarray,
    proxy: ProxyTerms,
    samples: np.ndarray,
    first_steps: np.ndarray,
) -> pd.DataFrame:
    """Tabulate one row per attributed sample; every error column is a mean over test losses.

    Args:
        delta, first, second_term: ``[Q, M]`` ground truth, ``F'(0)`` and ``F''(0) / 2``.
    """
    return pd.DataFrame(
        {
            "sample": samples,
            "first_step": first_steps,
            "mean_abs_delta": np.abs(delta).mean(axis=0),
            "measured_error": np.abs(delta - first).mean(axis=0),
            "second_order_term": np.abs(second_term).mean(axis=0),
            "second_order_residual": np.abs(delta - first - second_term).mean(axis=0),
            "proxy": np.abs(proxy.total.numpy()).mean(axis=0),
            "proxy_optimizer_term": np.abs(proxy.optimizer_term.numpy()).mean(axis=0),
            "proxy_curvature_term": np.abs(proxy.curvature_term.numpy()).mean(axis=0),
            "perturbation_size": proxy.perturbation_size.numpy(),
            "lr_length": proxy.lr_length.numpy(),
        }
    )


def summarize_errors(
    delta: np.ndarray,
    first: np.ndarray,
    second_term: np.ndarray,
    proxy_total: np.ndarray,
    per_sample: pd.DataFrame,
    run: dict,
) -> pd.DataFrame:
    """Summarize the run in one row: totals, Spearman against ground truth, and predictiveness.

    ``measured_error``, ``second_order_term``, ``second_order_residual`` and ``proxy`` are means
    over all (test, sample) pairs. ``spearman_error_*`` rank samples; ``ratio_*`` divide totals;
    ``sign_agreement`` is the fraction of pairs where ``F''/2`` has the sign of ``delta - F'``.
    """
    measured = per_sample.measured_error.to_numpy()
    error = delta - first
    row = {
        **run,
        "spearman_first_order": float(np.nanmean(rowwise_correlations(first, delta).spearman)),
        "spearman_second_order": float(np.nanmean(rowwise_correlations(first + second_term, delta).spearman)),
        "measured_error": float(measured.mean()),
        "second_order_term": float(per_sample.second_order_term.mean()),
        "second_order_residual": float(per_sample.second_order_residual.mean()),
        "proxy": float(per_sample.proxy.mean()),
        "proxy_optimizer_term": float(per_sample.proxy_optimizer_term.mean()),
        "proxy_curvature_term": float(per_sample.proxy_curvature_term.mean()),
        "spearman_error_second_order": _spearman(measured, per_sample.second_order_term.to_numpy()),
        "spearman_error_proxy": _spearman(measured, per_sample.proxy.to_numpy()),
        "spearman_error_proxy_optimizer_term": _spearman(measured, per_sample.proxy_optimizer_term.to_numpy()),
        "spearman_second_order_proxy": _spearman(per_sample.second_order_term.to_numpy(),
                                                 per_sample.proxy.to_numpy()),
        "ratio_second_order": float(per_sample.second_order_term.sum() / measured.sum()),
        "ratio_proxy": float(per_sample.proxy.sum() / measured.sum()),
        "sign_agreement": float((np.sign(second_term) == np.sign(error)).mean()),
        "sign_agreement_proxy": float((np.sign(proxy_total) == np.sign(error)).mean()),
        "mean_abs_delta": float(np.abs(delta).mean()),
    }
    return pd.DataFrame([row])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)
