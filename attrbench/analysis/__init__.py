"""Studies a run can add after its evaluation, chosen with ``attrbench run +analysis=NAME``.

``error``: the algorithm-level error of the first-order estimate against the exact second-order
term and the closed-form proxy (:mod:`attrbench.analysis.error`). ``system``: how precision,
trajectory storage, checkpoint spacing and reruns move the ground truth and AdamW-influence's
Spearman (:mod:`attrbench.analysis.system`).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# name -> "module:function"; modules are imported on use because they import the pipeline.
ANALYSES = {
    "error": "attrbench.analysis.error:run_error_analysis",
    "system": "attrbench.analysis.system:run_system_study",
}


def check_analysis(cfg) -> None:
    """Reject an unknown analysis or invalid analysis options before any work starts.

    Raises:
        ValueError: Naming the invalid value and the fix.
    """
    node = cfg.get("analysis")
    if node is None:
        return
    name = node.get("name")
    if name not in ANALYSES:
        raise ValueError(f"analysis.name={name!r} is not one of {', '.join(ANALYSES)}; use +analysis=error or +analysis=system")
    if name == "system":
        if cfg.dtype != "float64":
            raise ValueError(f"the system study compares against a float64 reference; run it with dtype=float64, not {cfg.dtype}")
        for dtype_name in node.storage_dtypes:
            if dtype_name not in ("float64", "float32", "bfloat16", "float16"):
                raise ValueError(f"analysis.storage_dtypes contains {dtype_name!r}; use float32, bfloat16 or float16")
        for every in node.checkpoint_every:
            if int(every) < 1:
                raise ValueError(f"analysis.checkpoint_every contains {every}; every spacing must be at least 1")
        if int(node.noise_floor_chunk_size) < 1:
            raise ValueError(f"analysis.noise_floor_chunk_size={node.noise_floor_chunk_size} must be at least 1")
    if name == "error":
        proxy = node.get("proxy") or {}
        if int(proxy.get("curvature_batch_size", 256)) < 1:
            raise ValueError(f"analysis.proxy.curvature_batch_size={proxy.get('curvature_batch_size')} must be at least 1")


def run_analysis(experiment, trajectory, stages: dict, groundtruth, run_dir: str | Path) -> None:
    """Run the analysis that ``cfg.analysis.name`` selects, if any, and write its tables into ``run_dir``.

    Args:
        experiment: The run's :class:`~attrbench.experiment.Experiment`.
        trajectory: Its recorded trajectory.
        stages: The pipeline's stages by name; an analysis adds the stages it opens.
        groundtruth: The merged leave-one-out ground truth
            (:class:`~attrbench.groundtruth.shards.MergedGroundTruth`).

    Raises:
        ValueError: If ``analysis.name`` is not one of :data:`ANALYSES`.
    """
    node = experiment.config.get("analysis")
    if node is None:
        return
    check_analysis(experiment.config)
    name = node.get("name")
    module_name, function_name = ANALYSES[name].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    log.info("analysis %s: starting", name)
    function(experiment, trajectory, stages, groundtruth, Path(run_dir))
