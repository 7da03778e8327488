"""A recorded training run: what the influence methods and leave-one-out retraining read.

On disk a trajectory is a directory::

    manifest.json                  format version, steps, learning rates, optimizer, layout,
                                   dtypes, checkpoint steps, SHA-256 of every file below
    batches.safetensors            "indices" [T, max_batch] int64 (-1 padded), "sizes" [T]
    checkpoints/step_000000.safetensors
                                   "theta" [P] and the optimizer state for that parameter
                                   ("exp_avg", "exp_avg_sq", "step" for AdamW), after that
                                   many updates; step 0 is the initialization

Checkpoints are kept every ``checkpoint_every`` steps and always at the last step. The states in
between are recomputed exactly by replaying the recorded steps (see :mod:`attrbench.training.trainer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attrbench.io import load_tensors, read_json, save_tensors, sha256, write_json
from attrbench.params import ParameterLayout
from attrbench.training.optim import OptimizerSpec
from attrbench.training.schedule import BatchSchedule

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CorruptTrajectoryError(RuntimeError):
    """A stored trajectory file is missing or does not match its checksum."""


@dataclass
class Trajectory:
    """Batches, learning rates, optimizer and parameter/optimizer checkpoints of one run.

    Attributes:
        layout: Names and shapes behind the flat parameter vector.
        optimizer: The optimizer class and hyperparameters the run used.
        batches: The batch of each step.
        lrs: Learning rate of each step 1..T.
        checkpoint_every: Spacing of stored checkpoints (the last step is always stored).
        dtype: Training dtype.
        states: Checkpoints by step, loaded lazily from ``directory`` when read from disk.
        directory: Where the trajectory is stored, if it was saved or loaded.
    """

    layout: ParameterLayout
    optimizer: OptimizerSpec
    batches: BatchSchedule
    lrs: list[float]
    checkpoint_every: int
    dtype: torch.dtype
    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    directory: Path | None = None
    storage_dtype: torch.dtype | None = None
    _checksums: dict[str, str] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.batches.num_steps

    @property
    def checkpoint_steps(self) -> list[int]:
        return checkpoint_steps(self.num_steps, self.checkpoint_every)

    def checkpoint_at_or_before(self, step: int) -> int:
        return max(s for s in self.checkpoint_steps if s <= step)

    def state(self, step: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Stored parameters and optimizer state after ``step`` updates, in the training dtype."""
        if step not in self.states:
            if self.directory is None or step not in self.checkpoint_steps:
                raise KeyError(f"no checkpoint stored for step {step}; stored: {self.checkpoint_steps}")
            return self._load_state(step, device)
        return {key: _to_training(value, self.dtype).to(device) for key, value in self.states[step].items()}

    def final_parameters(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.state(self.num_steps, device)["theta"]

    def _load_state(self, step: int, device) -> dict[str, torch.Tensor]:
        name = checkpoint_file(step)
        path = self.directory / name
        if not path.exists():
            raise CorruptTrajectoryError(f"trajectory checkpoint {path} is missing")
        expected = self._checksums.get(name)
        if expected is not None and sha256(path) != expected:
            raise CorruptTrajectoryError(f"trajectory checkpoint {path} does not match its SHA-256 in manifest.json")
        return {key: _to_training(value, self.dtype) for key, value in load_tensors(path, device).items()}

    def save(self, directory: str | Path, storage_dtype: torch.dtype | None = None) -> None:
        """Write the trajectory (see the module docstring); ``storage_dtype`` casts the checkpoints."""
        writer = TrajectoryWriter(directory, storage_dtype or self.storage_dtype or self.dtype)
        for step in self.checkpoint_steps:
            writer.write_checkpoint(step, self.state(step))
        writer.finish(self)

    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> Trajectory:
        """Read a saved trajectory; checkpoints are loaded (and checksummed) when first used.

        Raises:
            CorruptTrajectoryError: If the manifest or the batch file is missing or corrupt, or
                (with ``verify``) any checkpoint's checksum does not match.
        """
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.exists():
            raise CorruptTrajectoryError(f"{manifest_path} is missing: the trajectory was not saved completely")
        manifest = read_json(manifest_path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CorruptTrajectoryError(
                f"{manifest_path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}"
            )
        checksums = manifest["files"]
        if verify:
            _verify_files(directory, checksums)
        batch_tensors = load_tensors(directory / "batches.safetensors")
        return cls(
            layout=ParameterLayout.from_json(manifest["layout"]),
            optimizer=OptimizerSpec.from_json(manifest["optimizer"]),
            batches=BatchSchedule(batch_tensors["indices"], batch_tensors["sizes"]),
            lrs=[float(lr) for lr in manifest["lrs"]],
            checkpoint_every=int(manifest["checkpoint_every"]),
            dtype=DTYPES[manifest["dtype"]],
            directory=directory,
            storage_dtype=DTYPES[manifest["storage_dtype"]],
            _checksums=checksums,
        )


class TrajectoryWriter:
    """Write a trajectory's checkpoints one at a time, then its batches and manifest.

    Training streams each checkpoint to disk as soon as it exists, so memory holds none of them.
    The manifest is written last: a directory without ``manifest.json`` is an unfinished write.
    """

    def __init__(self, directory: str | Path, storage_dtype: torch.dtype):
        self.directory = Path(directory)
        self.storage_dtype = storage_dtype
        self.checksums: dict[str, str] = {}
        (self.directory / "manifest.json").unlink(missing_ok=True)

    def write_checkpoint(self, step: int, state: dict[str, torch.Tensor]) -> None:
        tensors = {key: _to_storage(value, self.storage_dtype) for key, value in state.items()}
        name = checkpoint_file(step)
        self.checksums[name] = save_tensors(self.directory / name, tensors, metadata={"step": str(step)})

    def finish(self, trajectory: Trajectory) -> None:
        """Write the batches and the manifest, and point ``trajectory`` at the files."""
        missing = [step for step in trajectory.checkpoint_steps if checkpoint_file(step) not in self.checksums]
        if missing:
            raise ValueError(f"trajectory checkpoints for steps {missing} were never written")
        batches = trajectory.batches
        self.checksums["batches.safetensors"] = save_tensors(
            self.directory / "batches.safetensors", {"indices": batches.indices, "sizes": batches.sizes}
        )
        manifest = {
            "format_version": FORMAT_VERSION,
            "num_steps": trajectory.num_steps,
            "lrs": trajectory.lrs,
            "checkpoint_every": trajectory.checkpoint_every,
            "checkpoint_steps": trajectory.checkpoint_steps,
            "dtype": dtype_name(trajectory.dtype),
            "storage_dtype": dtype_name(self.storage_dtype),
            "optimizer": trajectory.optimizer.to_json(),
            "layout": trajectory.layout.to_json(),
            "files": self.checksums,
        }
        write_json(self.directory / "manifest.json", manifest)
        trajectory.directory, trajectory.storage_dtype = self.directory, self.storage_dtype
        trajectory._checksums = dict(self.checksums)


def _verify_files(directory: Path, checksums: dict[str, str]) -> None:
    for name, expected in checksums.items():
        path = directory / name
        if not path.exists():
            raise CorruptTrajectoryError(f"trajectory file {path} is missing")
        if sha256(path) != expected:
            raise CorruptTrajectoryError(f"trajectory file {path} does not match its SHA-256 in manifest.json")


def checkpoint_steps(num_steps: int, every: int) -> list[int]:
    if every < 1:
        raise ValueError(f"trajectory.checkpoint_every={every} must be at least 1")
    steps = list(range(0, num_steps + 1, every))
    if steps[-1] != num_steps:
        steps.append(num_steps)
    return steps


def checkpoint_file(step: int) -> str:
    return f"checkpoints/step_{step:06d}.safetensors"


def _to_storage(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype) if value.is_floating_point() and value.dim() > 0 else value


def _to_training(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype) if value.is_floating_point() and value.dim() > 0 else value
