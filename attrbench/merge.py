"""``attrbench merge PATH...``: assemble the ground-truth shards of one run from their files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attrbench.groundtruth.shards import MissingShardsError, ShardMismatchError, merge_paths
from attrbench.io import write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attrbench merge",
        description="Find the ground-truth shard files (groundtruth_shard_K_of_N.safetensors) of one run, "
        "check that they come from that run (same configuration, trajectory and sample set) and that no "
        "shard is missing, and write the merged leave-one-out deltas.",
    )
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                        help="a shard file, or a directory searched recursively (a sweep directory, a run "
                        "directory, or any directory containing the shard files)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="merged file to write (default: groundtruth.safetensors in the first PATH if it is "
                        "a directory, else in the current directory)")
    return parser


def merge_command(argv: list[str]) -> int:
    """Run ``attrbench merge``; returns the exit status (1 on missing or mismatched shards)."""
    arguments = build_parser().parse_args(argv)
    first = arguments.paths[0]
    output = arguments.output or (first if first.is_dir() else Path.cwd()) / "groundtruth.safetensors"
    try:
        merged = merge_paths(arguments.paths)
    except (MissingShardsError, ShardMismatchError, FileNotFoundError) as error:
        print(f"attrbench merge: {error}", file=sys.stderr)
        return 1
    digest = merged.save(output)
    write_json(output.with_suffix(".json"), {
        "num_shards": merged.identity.num_shards,
        "num_samples": merged.identity.num_samples,
        "num_test": merged.identity.num_test,
        "removal": merged.identity.removal,
        "trajectory_sha256": merged.identity.trajectory_sha256,
        "sha256": digest,
        "sources": merged.sources,
    })
    print(f"merged {merged.identity.num_shards} shards ({merged.identity.num_samples} samples x "
          f"{merged.identity.num_test} test points) into {output}")
    return 0
