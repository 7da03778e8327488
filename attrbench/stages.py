"""Stage outputs keyed by the configuration that produced them.

Each pipeline stage (training, one ground-truth shard, one influence method, the evaluation)
writes into ``cache_dir/<stage>/<key16>/``, where the key is a SHA-256 of the stage's
configuration together with the keys and content checksums of the stage outputs it reads. So a
changed configuration gives a new key, and the stage and everything downstream are recomputed.

A stage directory contains:

* ``stage.json``: written last, when the stage finished. It stores the key, the configuration,
  the SHA-256 of every output file, when the computation started and finished, and how many
  jobs began computing the stage (``attempts``). A rerun that finds it, with every checksum
  matching, reuses the outputs. A missing or corrupt output is logged as a warning and the
  stage is recomputed.
* ``attempts.json``: the attempt counter and start time of the computation in progress.
* ``.lock``: a file lock held while a job checks or computes the stage, so concurrent jobs (the
  shards of one sweep) never compute the same stage twice. The others wait for the lock and
  then find the stage finished. The operating system releases the lock of a killed job.

Every file is written to a temporary name and renamed into place (:mod:`attrbench.io`). So a
killed job leaves either the old file or the new one, plus possibly some ``.*.tmp`` files. The
next job that takes the lock deletes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from attrbench.io import _atomic_target, _replace, read_json, sha256, write_json

log = logging.getLogger(__name__)

RECORD = "stage.json"
ATTEMPTS = "attempts.json"
LOCK = ".lock"
# While waiting for another job's lock, log a reminder this often (seconds).
WAIT_LOG_INTERVAL = 60.0


class StageOutOfMemoryError(RuntimeError):
    """A stage ran out of GPU memory; the message names the setting to lower."""


def config_key(config: dict) -> str:
    """SHA-256 of the configuration, as canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def timestamp() -> str:
    """Return the current UTC time in ISO 8601 with microseconds, as stored in stage records."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class Stage:
    """One keyed stage directory.

    Attributes:
        name: Stage name, also the directory under ``cache_dir`` (``train``, ``influence/sgd_influence``).
        key: SHA-256 of ``config``.
        directory: ``cache_dir/<name>/<key[:16]>``.
        config: What the outputs depend on (JSON-serializable).
        status: ``"reused"``, ``"computed"`` or ``"resumed"`` once the pipeline has handled the stage.
    """

    name: str
    key: str
    directory: Path
    config: dict
    status: str = "pending"
    _started: float = field(default=0.0, repr=False)
    _started_at: str = field(default="", repr=False)
    _attempt: int = field(default=0, repr=False)

    @property
    def label(self) -> str:
        return f"stage {self.name} ({self.directory})"

    def is_complete(self) -> bool:
        """Return True if the stage finished with this key and every output file matches its checksum."""
        record_path = self.directory / RECORD
        if not record_path.exists():
            return False
        try:
            record = read_json(record_path)
        except json.JSONDecodeError:
            log.warning("%s: %s is not valid JSON; treating the stage as unfinished", self.label, RECORD)
            return False
        if record.get("key") != self.key:
            log.warning("%s: %s has a different key; treating the stage as unfinished", self.label, RECORD)
            return False
        for name, expected in record.get("files", {}).items():
            path = self.directory / name
            if not path.exists():
                log.warning("%s: output %s is missing; treating the stage as unfinished", self.label, name)
                return False
            if sha256(path) != expected:
                log.warning("%s: output %s does not match its SHA-256 in %s (corrupt or truncated); "
                            "treating the stage as unfinished", self.label, name, RECORD)
                return False
        return True

    def record(self) -> dict:
        """Read the ``stage.json`` of a finished stage."""
        return read_json(self.directory / RECORD)

    @contextlib.contextmanager
    def lock(self, blocking: bool = True) -> Iterator[bool]:
        """Hold the stage's file lock; yields False if ``blocking`` is off and another job holds it.

        A blocking wait logs which lock it waits for, then repeats the message every
        :data:`WAIT_LOG_INTERVAL` seconds.

        NOTE: jobs on different machines exclude each other only where the file system supports
        file locks across machines (NFS with its lock service, Lustre mounted with ``flock``).
        """
        lock = FileLock(str(self.directory / LOCK))
        if not _try_acquire(lock):
            if not blocking:
                yield False
                return
            _wait_for(lock, self.label)
        try:
            _remove_temporary_files(self.directory)
            yield True
        finally:
            lock.release()

    def begin(self) -> int:
        """Start (or restart) computing: drop the old record, count the attempt and return its number.

        Call this while holding :meth:`lock`.
        """
        (self.directory / RECORD).unlink(missing_ok=True)
        previous = _read_attempts(self.directory / ATTEMPTS)
        self._attempt = previous + 1
        self._started, self._started_at = time.perf_counter(), timestamp()
        write_json(self.directory / ATTEMPTS, {"attempts": self._attempt, "started": self._started_at})
        log.info("%s: computing (attempt %d)", self.label, self._attempt)
        return self._attempt

    def complete(self, files: dict[str, str], extra: dict | None = None) -> None:
        """Write ``stage.json``, marking the stage finished; ``files`` maps names to SHA-256."""
        write_json(
            self.directory / RECORD,
            {
                "stage": self.name,
                "key": self.key,
                "config": self.config,
                "files": files,
                "attempts": self._attempt,
                "started": self._started_at,
                "finished": timestamp(),
                "elapsed_seconds": round(time.perf_counter() - self._started, 3),
                **(extra or {}),
            },
        )

    def copy_outputs(self, names: list[str], destination: str | Path) -> None:
        """Copy output files of this stage into ``destination`` (atomically, one by one)."""
        for name in names:
            copy_file(self.directory / name, Path(destination) / Path(name).name)


def check_cache_dir(cache_dir: str | Path) -> None:
    """Raise a ValueError that names ``cache_dir`` unless stages can be written there.

    Every stage takes a file lock in its directory, even to read a finished result, so a
    read-only cache cannot serve a run.
    """
    path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ValueError(
            f"cache_dir={str(cache_dir)!r} is not a writable directory ({error.strerror}). Point cache_dir at "
            "a writable directory; to reuse a read-only cache, copy it there first"
        ) from error


def open_stage(cache_dir: str | Path, name: str, config: dict) -> Stage:
    """Create (if needed) the stage directory for ``config``, without reading or locking it."""
    key = config_key(config)
    directory = Path(cache_dir) / name / key[:16]
    directory.mkdir(parents=True, exist_ok=True)
    return Stage(name, key, directory, config)


def copy_file(source: str | Path, destination: str | Path) -> None:
    """Copy ``source`` to a temporary file next to ``destination``, then rename it into place."""
    destination = Path(destination)
    temporary = _atomic_target(destination)
    try:
        shutil.copyfile(source, temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _replace(temporary, destination)


@contextlib.contextmanager
def suggest_on_out_of_memory(stage: str, advice: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into one that names the setting to lower.

    Raises:
        StageOutOfMemoryError: From the ``torch.cuda.OutOfMemoryError`` raised inside the block.
    """
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        summary = str(error).strip().splitlines()[0] if str(error).strip() else "CUDA out of memory"
        raise StageOutOfMemoryError(f"{stage} ran out of GPU memory ({summary}). {advice}") from error


def _try_acquire(lock: FileLock) -> bool:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True


def _wait_for(lock: FileLock, label: str) -> None:
    started = time.perf_counter()
    log.info("%s: another job holds %s and is computing this stage; waiting for it", label, lock.lock_file)
    while True:
        try:
            lock.acquire(timeout=WAIT_LOG_INTERVAL)
            return
        except Timeout:
            log.info("%s: still waiting for %s after %.0f s", label, lock.lock_file, time.perf_counter() - started)


def _read_attempts(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        return int(read_json(path).get("attempts", 0))
    except (json.JSONDecodeError, TypeError, ValueError):
        log.warning("%s is not valid; counting attempts from 0", path)
        return 0


def _remove_temporary_files(directory: Path) -> None:
    """Delete ``.*.tmp`` files that a killed job left behind; only the lock holder may call this."""
    for path in directory.rglob(".*.tmp"):
        log.info("removing %s, left by an interrupted write", path)
        path.unlink(missing_ok=True)
