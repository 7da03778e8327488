"""Measure the cost of selection runs as a multiple of one plain training run.

Builds the ``attrbench select`` setup from the given Hydra overrides (default: the MNIST MLP
setting, float64), then times in this one process:

* a plain training run (``train``) on the training split, the baseline, measured next to each
  method;
* an online look-ahead run for every horizon K in ``--horizons``;
* a random-drop run;
* offline selection: the score sweep over the recorded reference run plus the retraining.

Times are CPU seconds of this process (with one torch thread, as ``OMP_NUM_THREADS=1`` sets,
that is the compute the run needs). Each method alternates with a plain training run
``--repeats`` times, and the ratio is taken between the two minimum times. Prints one row per
method. Example:

    OMP_NUM_THREADS=1 python scripts/benchmark_selection.py --horizons 0 1 2 4 8 16 --repeats 3 \\
        train.epochs=2 optimizer.lr=1e-2
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch
from hydra import compose, initialize_config_dir

from attrbench.app import CONFIG_DIR
from attrbench.selection.offline import train_offline
from attrbench.selection.online import train_online
from attrbench.selection.runner import build_selection
from attrbench.training.trainer import train

warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)


def paired_times(function, baseline, repeats: int) -> tuple[float, float]:
    """Minimum CPU times of ``function`` and ``baseline`` over ``repeats`` alternating rounds.

    CPU time of this process is less disturbed by other jobs on a shared machine than wall time,
    and alternating keeps both under the same load.
    """
    times, baseline_times = [], []
    for _ in range(repeats):
        start = time.process_time()
        baseline()
        baseline_times.append(time.process_time() - start)
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return min(times), min(baseline_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizons", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the select config")
    arguments = parser.parse_args()

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("select", overrides=["progress=false", *arguments.overrides])
    setup = build_selection(cfg)
    task, data, batches, lrs, optimizer = setup.task, setup.data, setup.batches, setup.lrs, setup.optimizer
    fraction = cfg.selection.fraction

    def plain():
        return train(task, data.train, batches, lrs, optimizer, progress=False)

    print(
        f"{setup.description}: {batches.num_steps} steps, {data.num_train} train samples, "
        f"{task.num_parameters} parameters, device {setup.device}"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )
    plain()  # warm-up: first calls of the torch.func transforms are slower
    reference = plain()
    methods = {
        "offline (score sweep + retraining)": lambda: train_offline(
            task, data.train, data.validation, reference, fraction, progress=False
        ),
        "random drop": lambda: train_online(
            task, data.train, data.validation, batches, lrs, optimizer, "random", fraction, progress=False
        ),
    }
    for horizon in arguments.horizons:
        methods[f"online look-ahead K={horizon}"] = lambda horizon=horizon: train_online(
            task,
            data.train,
            data.validation,
            batches,
            lrs,
            optimizer,
            "lookahead",
            fraction,
            horizon,
            progress=False,
        )
    rows = []
    for name, function in methods.items():
        seconds, baseline = paired_times(function, plain, arguments.repeats)
        rows.append((name, seconds, baseline))

    print(f"load average {os.getloadavg()[0]:.2f} at end\n")
    print("| method | CPU seconds | plain training, CPU seconds | x plain training |")
    print("|---|---:|---:|---:|")
    for name, seconds, baseline in rows:
        print(f"| {name} | {seconds:.2f} | {baseline:.2f} | {seconds / baseline:.1f} |")


if __name__ == "__main__":
    main()
