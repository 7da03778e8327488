"""Split leave-one-out ground truth into shards, store each shard, and merge them back.

The attributed samples are sorted by the step at which each first appears and cut into chunks
of ``groundtruth.chunk_size`` counterfactual runs, exactly as :func:`leave_one_out` does. A
chunk is the unit of work (one stacked retraining) and of checkpointing. Shard ``k`` of ``n``
gets chunks ``k, k + n, k + 2n, ...``. Chunks that start late in training are cheaper, and
dealing them out in turn gives every shard a similar mix. Because every shard computes whole
chunks of the same plan, each chunk is the same computation in a sharded and an unsharded run,
so the merged deltas equal the unsharded ones bit for bit (on a deterministic backend).

A shard file is a safetensors file with ``delta`` ``[num_test, n]``, ``samples`` ``[n]`` (the
training-set indices) and ``positions`` ``[n]`` (their positions in the run's list of attributed
samples), plus metadata that identifies the run it belongs to (see :class:`ShardIdentity`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attrbench.io import load_tensors, save_tensors
from attrbench.stages import config_key

SHARD_FORMAT = "attrbench-groundtruth-shard-1"
SHARD_GLOB = "groundtruth_shard_*_of_*.safetensors"

# Description of each identity field, for mismatch messages.
_FIELD_MEANING = {
    "num_shards": "groundtruth.num_shards",
    "config_sha256": "the ground-truth configuration (training config, removal, chunk_size, num_shards)",
    "trajectory_sha256": "the reference trajectory (its manifest.json checksum)",
    "samples_sha256": "the set of attributed samples (groundtruth.num_samples, seed or data)",
    "num_test": "the number of test points",
}


class ShardMismatchError(ValueError):
    """Shard files that do not belong to the same run, or that overlap inconsistently."""


class MissingShardsError(ValueError):
    """Some shards of a run have not been computed (or not found)."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


def plan_chunks(first_steps: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Cut the attributed samples into chunks as :func:`leave_one_out` does; return each chunk's positions."""
    if chunk_size < 1:
        raise ValueError(f"groundtruth.chunk_size={chunk_size} must be at least 1")
    order = torch.argsort(first_steps, stable=True)
    return list(torch.split(order, chunk_size))


def shard_chunk_ids(num_chunks: int, num_shards: int, shard: int) -> list[int]:
    """Return the chunks that shard ``shard`` of ``num_shards`` computes."""
    return list(range(shard, num_chunks, num_shards))


def check_sharding(num_samples: int, chunk_size: int, num_shards: int, shard: int | None) -> None:
    """Reject a shard layout that cannot work, naming the setting to change.

    Raises:
        ValueError: If ``num_shards`` is below 1, ``shard`` is outside ``0..num_shards-1`` or some
            shard would get no chunk.
    """
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise ValueError(f"groundtruth.num_shards={num_shards!r} must be an integer of at least 1")
    if shard is not None and (not isinstance(shard, int) or isinstance(shard, bool)
                              or not 0 <= shard < num_shards):
        raise ValueError(
            f"groundtruth.shard={shard!r} must be null (every shard) or an integer from 0 to "
            f"{num_shards - 1} (groundtruth.num_shards={num_shards})"
        )
    if chunk_size < 1:
        raise ValueError(f"groundtruth.chunk_size={chunk_size} must be at least 1")
    num_chunks = math.ceil(num_samples / chunk_size)
    if num_shards > num_chunks:
        if num_shards <= num_samples:
            fix = f"or lower groundtruth.chunk_size to at most {num_samples // num_shards}"
        else:  # even one run per chunk leaves shards empty
            fix = f"or raise groundtruth.num_samples to at least {num_shards}"
        raise ValueError(
            f"groundtruth.num_shards={num_shards} exceeds the {num_chunks} chunks of "
            f"groundtruth.chunk_size={chunk_size} counterfactual runs over groundtruth.num_samples={num_samples}, "
            f"so some shards would be empty; use at most {num_chunks} shards {fix}"
        )


def shard_file_name(shard: int, num_shards: int) -> str:
    return f"groundtruth_shard_{shard:04d}_of_{num_shards:04d}.safetensors"


@dataclass(frozen=True)
class ShardIdentity:
    """Run identity that every shard of one run shares; shards merge only if all of it matches.

    Attributes:
        num_shards: Shards the attributed samples were split into.
        config_sha256: Key of the ground-truth configuration without the shard index.
        trajectory_sha256: SHA-256 of the reference trajectory's ``manifest.json``, which lists
            the checksum of every checkpoint, so equal values mean an identical trajectory.
        samples_sha256: Key of the full list of attributed samples.
        num_samples: Length of that list.
        num_test: Test points (rows of ``delta``).
        removal: ``keep_denominator`` or ``renormalize``.
    """

    num_shards: int
    config_sha256: str
    trajectory_sha256: str
    samples_sha256: str
    num_samples: int
    num_test: int
    removal: str

    def to_metadata(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ShardIdentity:
        return cls(
            num_shards=int(metadata["num_shards"]),
            config_sha256=metadata["config_sha256"],
            trajectory_sha256=metadata["trajectory_sha256"],
            samples_sha256=metadata["samples_sha256"],
            num_samples=int(metadata["num_samples"]),
            num_test=int(metadata["num_test"]),
            removal=metadata["removal"],
        )


def samples_key(samples: torch.Tensor) -> str:
    return config_key({"samples": samples.tolist()})


@dataclass
class Shard:
    """One shard's leave-one-out deltas and where they belong."""

    shard: int
    identity: ShardIdentity
    delta: torch.Tensor
    samples: torch.Tensor
    positions: torch.Tensor
    path: Path | None = None

    def save(self, path: str | Path) -> str:
        """Write the shard file atomically and return its SHA-256."""
        metadata = {"format": SHARD_FORMAT, "shard": str(self.shard), **self.identity.to_metadata()}
        return save_tensors(path, {"delta": self.delta, "samples": self.samples, "positions": self.positions},
                            metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> Shard:
        """Read a shard file.

        Raises:
            ShardMismatchError: If the file is not a readable attrbench ground-truth shard.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_tensors(path)
        except SafetensorError as error:
            raise ShardMismatchError(f"{path} is not a valid safetensors file ({error}); it may be truncated, "
                                     "so copy or recompute that shard") from error
        if metadata.get("format") != SHARD_FORMAT:
            raise ShardMismatchError(f"{path} is not a ground-truth shard file (format {metadata.get('format')!r}, "
                                     f"expected {SHARD_FORMAT!r})")
        return cls(int(metadata["shard"]), ShardIdentity.from_metadata(metadata), tensors["delta"],
                   tensors["samples"], tensors["positions"], path)


@dataclass
class MergedGroundTruth:
    """Leave-one-out deltas of every attributed sample, assembled from all shards."""

    delta: torch.Tensor
    samples: torch.Tensor
    identity: ShardIdentity
    sources: list[str]

    def save(self, path: str | Path) -> str:
        metadata = {"num_shards": str(self.identity.num_shards), "removal": self.identity.removal,
                    "trajectory_sha256": self.identity.trajectory_sha256,
                    "sources": json.dumps(self.sources)}
        return save_tensors(path, {"delta": self.delta, "samples": self.samples}, metadata=metadata)


def merge_shards(shards: list[Shard], where: str = "the given shards") -> MergedGroundTruth:
    """Check that ``shards`` form one complete run and assemble their deltas.

    Args:
        shards: Shard files of one run, in any order; identical duplicates are allowed.
        where: Where the shards came from, for error messages.

    Raises:
        ShardMismatchError: If the shards disagree on the run identity, or one shard index appears
            twice with different contents, or the positions do not cover the samples exactly once.
        MissingShardsError: If some shard indices are absent.
    """
    if not shards:
        raise MissingShardsError(f"no ground-truth shard files ({SHARD_GLOB}) found in {where}", [])
    _check_same_identity(shards)
    identity = shards[0].identity
    by_index = _deduplicate(shards)
    missing = [index for index in range(identity.num_shards) if index not in by_index]
    if missing:
        raise MissingShardsError(
            f"missing ground-truth shards: {_list(missing)} of {identity.num_shards} in {where} "
            f"(found {_list(sorted(by_index))}); run them with groundtruth.shard=<index>, "
            f"or with groundtruth.shard=null to compute every missing shard in one job",
            missing,
        )

    delta = torch.full((identity.num_test, identity.num_samples), float("nan"), dtype=shards[0].delta.dtype)
    samples = torch.full((identity.num_samples,), -1, dtype=torch.long)
    covered = torch.zeros(identity.num_samples, dtype=torch.long)
    for shard in by_index.values():
        delta[:, shard.positions] = shard.delta
        samples[shard.positions] = shard.samples
        covered.index_add_(0, shard.positions, torch.ones_like(shard.positions))
    if not torch.all(covered == 1):
        raise ShardMismatchError(f"the shards in {where} do not cover every attributed sample exactly once "
                                 f"({int((covered == 0).sum())} uncovered, {int((covered > 1).sum())} repeated)")
    if samples_key(samples) != identity.samples_sha256:
        raise ShardMismatchError(f"the samples assembled from the shards in {where} do not match their "
                                 "samples_sha256; the shard files were edited or come from different runs")
    sources = [str(by_index[index].path) for index in sorted(by_index)]
    return MergedGroundTruth(delta, samples, identity, sources)


def find_shard_files(paths: list[str | Path]) -> list[Path]:
    """Collect shard files: each path is a shard file or a directory searched recursively.

    Raises:
        FileNotFoundError: If a path does not exist.
    """
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(file for file in path.rglob(SHARD_GLOB) if not file.name.startswith("."))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return sorted(set(found))


def merge_paths(paths: list[str | Path]) -> MergedGroundTruth:
    """Load the shard files found under ``paths`` (see :func:`find_shard_files`) and merge them."""
    shards = [Shard.load(path) for path in find_shard_files(paths)]
    return merge_shards(shards, where=", ".join(str(path) for path in paths))


def merge_directory(directory: str | Path) -> MergedGroundTruth:
    """Load every shard file under ``directory`` and merge them (see :func:`merge_shards`)."""
    return merge_paths([directory])


def _check_same_identity(shards: list[Shard]) -> None:
    for field_name, meaning in _FIELD_MEANING.items():
        values: dict[str, list[Shard]] = {}
        for shard in shards:
            values.setdefault(str(getattr(shard.identity, field_name)), []).append(shard)
        if len(values) > 1:
            groups = "; ".join(
                f"{_short(value)} in {', '.join(_describe(shard) for shard in group)}" for value, group in values.items()
            )
            raise ShardMismatchError(
                f"ground-truth shards differ in {meaning} ({field_name}): {groups}. Shards merge only when "
                "they come from the same configuration, trajectory and sample set; recompute the odd ones "
                "with the same overrides and cache_dir as the others"
            )


def _deduplicate(shards: list[Shard]) -> dict[int, Shard]:
    by_index: dict[int, Shard] = {}
    for shard in shards:
        if not 0 <= shard.shard < shard.identity.num_shards:
            raise ShardMismatchError(f"{_describe(shard)} has index {shard.shard}, outside 0..{shard.identity.num_shards - 1}")
        seen = by_index.get(shard.shard)
        if seen is None:
            by_index[shard.shard] = shard
        elif not (torch.equal(seen.positions, shard.positions) and torch.equal(seen.delta, shard.delta)):
            raise ShardMismatchError(
                f"shard {shard.shard} appears twice with different contents: {seen.path} and {shard.path}; "
                "delete the stale copy"
            )
    return by_index


def _describe(shard: Shard) -> str:
    return f"shard {shard.shard} ({shard.path})" if shard.path is not None else f"shard {shard.shard}"


def _short(value: str) -> str:
    return value[:12] if len(value) == 64 else value


def _list(indices: list[int]) -> str:
    return ", ".join(str(index) for index in indices) if indices else "none"
