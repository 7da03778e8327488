"""Console entry point: ``attrbench <command> [arguments]``."""

from __future__ import annotations

import sys
import warnings

# torch.func's vmap-over-jvp scripts a helper internally (torch 2.14); users can do nothing about it.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

USAGE = """usage: attrbench <command> [arguments]

commands:
  run [overrides]   train, compute leave-one-out ground truth and influence, print the
                    Spearman table (a Hydra app: `attrbench run --help`, `attrbench run -m ...`)
  merge PATH...     check and merge one run's ground-truth shard files, found under the
                    given directories, into groundtruth.safetensors (`attrbench merge --help`)
  select [overrides]
                    train with data selection (none, random, lookahead with horizon K,
                    offline) and report the final test loss and accuracy (a Hydra app)
  select-report DIR [--output OUT]
                    aggregate the selection runs under DIR into a table and figures
  report DIR        gather every run under DIR into one table over seeds, and draw the figures
                    (`attrbench report --help`)
  figures DIR       redraw the figures from the tables that `attrbench report DIR` saved
"""


def _configs_missing(command: str) -> bool:
    """Print an error and return True when the Hydra configs of ``attrbench run``/``select`` are missing.

    They live in the repository's ``conf/`` directory, which only an editable install (or a
    source checkout on ``PYTHONPATH``) can see.
    """
    from pathlib import Path

    from attrbench.app import CONFIG_DIR

    if Path(CONFIG_DIR).is_dir():
        return False
    print(f"attrbench {command}: the Hydra config directory {CONFIG_DIR} does not exist. attrbench reads "
          "its configs from the repository's conf/ directory: install it with `pip install -e .` "
          "from a clone of the repository", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if not argv:  # a missing command is a usage error, as in argparse-based tools
        print(f"attrbench: no command given\n\n{USAGE}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command in ("run", "select") and _configs_missing(command):
        return 1
    if command == "run":
        from attrbench.app import run_app
        from attrbench.reporting.sweep import sweep_exit_status

        sys.argv = ["attrbench run", *rest]
        run_app()
        return sweep_exit_status()
    if command == "merge":
        from attrbench.merge import merge_command

        return merge_command(rest)
    if command == "select":
        from attrbench.selection.app import select_app

        from attrbench.reporting.sweep import sweep_exit_status

        sys.argv = ["attrbench select", *rest]
        select_app()
        return sweep_exit_status()
    if command == "select-report":
        from attrbench.selection.report import main as select_report

        return select_report(rest)
    if command in ("report", "figures"):
        from attrbench.reporting.commands import COMMANDS

        return COMMANDS[command](rest)
    print(f"attrbench: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
