"""Stage outputs keyed by the configuration that produced them.

Each pipeline stage (training, ground truth, one influence method) writes into
``cache_dir/<stage>/<key>/``, where ``key`` is a SHA-256 of the stage's configuration and the keys
of the stages it reads. A finished stage directory contains ``stage.json`` with the key, the
configuration, the SHA-256 of every output file and the time it took. A rerun with the same
configuration finds the record and skips the stage. A changed configuration gives a new key, so
the stage and everything downstream are recomputed. A missing or corrupt output file is detected
by its checksum, logged as a warning, and the stage is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from attrbench.io import read_json, sha256, write_json

log = logging.getLogger(__name__)

RECORD = "stage.json"


def config_key(config: dict) -> str:
    """SHA-256 of the configuration, as canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Stage:
    """One keyed stage directory."""

    name: str
    key: str
    directory: Path
    config: dict

    def is_complete(self) -> bool:
        """True if the stage finished with this key and every output file matches its checksum."""
        record_path = self.directory / RECORD
        if not record_path.exists():
            return False
        record = read_json(record_path)
        if record.get("key") != self.key:
            log.warning("stage %s at %s has a different key; recomputing", self.name, self.directory)
            return False
        for name, expected in record.get("files", {}).items():
            path = self.directory / name
            if not path.exists() or sha256(path) != expected:
                log.warning("stage %s: output %s is missing or corrupt; recomputing", self.name, path)
                return False
        return True

    def record(self) -> dict:
        return read_json(self.directory / RECORD)

    def complete(self, files: dict[str, str], elapsed: float, extra: dict | None = None) -> None:
        """Write ``stage.json``, marking the stage finished; ``files`` maps names to SHA-256."""
        write_json(
            self.directory / RECORD,
            {
                "stage": self.name,
                "key": self.key,
                "config": self.config,
                "files": files,
                "elapsed_seconds": round(elapsed, 3),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **(extra or {}),
            },
        )


def open_stage(cache_dir: str | Path, name: str, config: dict) -> Stage:
    key = config_key(config)
    directory = Path(cache_dir) / name / key[:16]
    directory.mkdir(parents=True, exist_ok=True)
    return Stage(name, key, directory, config)
