"""Compute one ground-truth shard inside its stage directory, checkpointing after every chunk.

While a shard is in progress, its stage directory contains::

    progress.json                   per finished chunk: file, SHA-256, samples, when it finished,
                                    how long it took and the attempt that computed it
    chunks/chunk_000007.safetensors "delta" [num_test, n] and "positions" [n] of chunk 7

A chunk file is written (atomically) before ``progress.json`` names it, so a killed job loses at
most the chunk it was computing. The next attempt reuses every recorded chunk whose file still
matches its SHA-256, warns about and recomputes any other, and computes the rest. When all
chunks are done, the shard file is written, ``stage.json`` records every chunk (with the attempt
and time that produced it), and the chunk files are deleted.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from attrbench.groundtruth.loo import leave_one_out
from attrbench.groundtruth.shards import Shard, ShardIdentity
from attrbench.io import load_tensors, read_json, save_tensors, sha256, write_json
from attrbench.stages import Stage, timestamp
from attrbench.tasks import Batch, Task
from attrbench.training.trajectory import Trajectory

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
SHARD_FILE = "shard.safetensors"


@dataclass
class ShardWork:
    """Inputs of one shard's computation.

    Attributes:
        shard: Index of the shard.
        identity: Run identity shared by all shards (stored in the shard file).
        samples: All attributed samples of the run (training-set indices).
        chunks: Positions into ``samples`` of every chunk of the run (see :func:`plan_chunks`).
        chunk_ids: The chunks of this shard.
    """

    shard: int
    identity: ShardIdentity
    samples: torch.Tensor
    chunks: list[torch.Tensor]
    chunk_ids: list[int]

    @property
    def positions(self) -> torch.Tensor:
        return torch.cat([self.chunks[chunk] for chunk in self.chunk_ids])


def chunk_file(chunk: int) -> str:
    return f"chunks/chunk_{chunk:06d}.safetensors"


def compute_shard(
    stage: Stage,
    work: ShardWork,
    task: Task,
    train_data: Batch,
    test_data: Batch,
    trajectory: Trajectory,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Shard:
    """Compute (or finish) the shard's chunks, write its shard file and mark the stage complete.

    Call this while holding the stage's lock.
    """
    attempt = stage.begin()
    records, deltas = _load_finished_chunks(stage, work)
    reused = len(records)
    if reused:
        log.info("groundtruth shard %d: resuming, %d of %d chunks already done", work.shard, reused, len(work.chunk_ids))
        stage.status = "resumed"
    todo = [chunk for chunk in work.chunk_ids if chunk not in records]
    description = f"leave-one-out shard {work.shard}/{work.identity.num_shards}"
    for chunk in tqdm(todo, desc=description, disable=not progress, leave=False):
        started = time.perf_counter()
        positions = work.chunks[chunk]
        deltas[chunk] = leave_one_out(
            task, train_data, test_data, trajectory, work.samples[positions], work.identity.removal,
            chunk_size=len(positions), progress=False, device=device,
        )
        digest = save_tensors(stage.directory / chunk_file(chunk), {"delta": deltas[chunk], "positions": positions})
        records[chunk] = {
            "file": chunk_file(chunk),
            "sha256": digest,
            "samples": len(positions),
            "attempt": attempt,
            "finished": timestamp(),
            "elapsed_seconds": round(time.perf_counter() - started, 3),
        }
        write_json(stage.directory / PROGRESS, {"key": stage.key, "chunks": _by_name(records)})

    shard = Shard(
        work.shard, work.identity, torch.cat([deltas[chunk] for chunk in work.chunk_ids], dim=1),
        work.samples[work.positions], work.positions, stage.directory / SHARD_FILE,
    )
    digest = shard.save(stage.directory / SHARD_FILE)
    stage.complete({SHARD_FILE: digest}, {
        "shard": work.shard,
        "num_shards": work.identity.num_shards,
        "chunks_reused": reused,
        "chunks_computed": len(todo),
        "chunks": _by_name(records),
    })
    _remove_chunk_files(stage, work.chunk_ids)
    return shard


def _load_finished_chunks(stage: Stage, work: ShardWork) -> tuple[dict[int, dict], dict[int, torch.Tensor]]:
    """Chunks that an earlier attempt finished and whose files are intact."""
    path = stage.directory / PROGRESS
    if not path.exists():
        return {}, {}
    try:
        progress = read_json(path)
    except json.JSONDecodeError:
        log.warning("groundtruth shard %d: %s is not valid JSON; starting over", work.shard, path)
        return {}, {}
    if progress.get("key") != stage.key:
        log.warning("groundtruth shard %d: %s belongs to another configuration; starting over", work.shard, path)
        return {}, {}
    records, deltas = {}, {}
    for name, record in progress.get("chunks", {}).items():
        chunk = int(name)
        file = stage.directory / record["file"]
        if chunk not in work.chunk_ids:
            continue
        if not file.exists() or sha256(file) != record["sha256"]:
            log.warning("groundtruth shard %d: chunk file %s is missing or does not match its SHA-256 in %s; "
                        "recomputing that chunk", work.shard, file, PROGRESS)
            continue
        tensors = load_tensors(file)
        if not torch.equal(tensors["positions"], work.chunks[chunk]):
            log.warning("groundtruth shard %d: chunk file %s contains other samples; recomputing that chunk",
                        work.shard, file)
            continue
        records[chunk], deltas[chunk] = record, tensors["delta"]
    return records, deltas


def _by_name(records: dict[int, dict]) -> dict[str, dict]:
    return {str(chunk): records[chunk] for chunk in sorted(records)}


def _remove_chunk_files(stage: Stage, chunk_ids: list[int]) -> None:
    for chunk in chunk_ids:
        (stage.directory / chunk_file(chunk)).unlink(missing_ok=True)
    (stage.directory / PROGRESS).unlink(missing_ok=True)
    chunk_directory = stage.directory / "chunks"
    if chunk_directory.is_dir() and not any(chunk_directory.iterdir()):
        chunk_directory.rmdir()
