#!/usr/bin/env bash
# Reproduce results/error and results/system: the algorithm-level error sweep on the MNIST MLP,
# the lr 1e-3 comparison of first- and second-order estimates (ReLU and GELU), and the
# system-level study. Usage: scripts/error_study.sh [OUTPUT_DIR]   (default: error_study)
#
# One thread per process: on a machine shared with other jobs PyTorch's default thread pool
# made the small elementwise operations here many times slower.
set -euo pipefail
out="${1:-error_study}"
cache="$out/cache"
export OMP_NUM_THREADS=1
run() { python -m attrbench.cli run "$@" "cache_dir=$cache" progress=false; }

# Error against learning rate and training length: 3 learning rates x 3 lengths x 3 seeds,
# 50 removed samples x 100 test points each. second_order also gives the first-order estimate.
run -m +analysis=error 'influence.methods=[second_order]' groundtruth.num_samples=50 data.num_test=100 \
    optimizer.lr=1e-2,1e-3,1e-4 train.epochs=1,2,3 seed=0,1,2 "hydra.sweep.dir=$out/sweep"
python scripts/error_sweep_figure.py "$out/sweep" --out "$out/error"

# First- against second-order estimate at lr 1e-3 on the full protocol (200 x 500), ReLU and GELU.
run -m +analysis=error seed=0,1,2 "hydra.sweep.dir=$out/lr1e-3/relu"
run -m +analysis=error model.activation=gelu seed=0,1,2 "hydra.sweep.dir=$out/lr1e-3/gelu"
for activation in relu gelu; do
    python scripts/error_sweep_figure.py "$out/lr1e-3/$activation" --seeds "$out/error/lr1e-3_$activation.md"
done

# System-level study at lr 1e-3, seed 0.
run +analysis=system "hydra.run.dir=$out/system"
