"""Device choice: the error for CUDA without CUDA, and a CUDA run against the same run on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from attrbench.app import CONFIG_DIR
from attrbench.experiment import resolve_device
from attrbench.io import load_tensors
from attrbench.pipeline import run_experiment

from test_cli import run_cli
from test_cifar_cli import EMBEDDED_TINY

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_rejected(name):
    message = f"device='{name}' but CUDA is not available; use device=cpu or device=auto"
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


@no_cuda
def test_auto_falls_back_to_cpu():
    assert resolve_device("auto") == torch.device("cpu")


@no_cuda
def test_cli_cuda_without_cuda_rejected(tmp_path):
    result = run_cli("run", "device=cuda", "progress=false", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "CUDA is not available; use device=cpu or device=auto" in result.stderr


@needs_cuda
def test_cuda_run_matches_cpu_run(tmp_path):
    """The CNN's whole pipeline on CUDA gives the CPU's ground truth and scores up to rounding.

    Each device gets its own cache directory, because stage keys leave the device out and the
    CUDA run would otherwise reuse the CPU run's stages.
    """
    outputs = {}
    for device in ("cpu", "cuda"):
        overrides = [*EMBEDDED_TINY, f"device={device}", f"cache_dir={tmp_path / device / 'cache'}"]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        run_dir = tmp_path / device
        run_experiment(cfg, run_dir)
        outputs[device] = (
            load_tensors(run_dir / "groundtruth.safetensors")["delta"],
            load_tensors(run_dir / "predictions.safetensors"),
            json.loads((run_dir / "summary.json").read_text()),
        )

    cpu_delta, cpu_predictions, _ = outputs["cpu"]
    cuda_delta, cuda_predictions, cuda_summary = outputs["cuda"]
    assert cuda_summary["device"].startswith("cuda")
    scale = float(cpu_delta.abs().max())
    assert scale > 0
    np.testing.assert_allclose(cuda_delta.numpy(), cpu_delta.numpy(), rtol=1e-6, atol=1e-9 * scale)
    for method, predicted in cpu_predictions.items():
        np.testing.assert_allclose(cuda_predictions[method].numpy(), predicted.numpy(),
                                   rtol=1e-6, atol=1e-9 * float(predicted.abs().max()), err_msg=method)
