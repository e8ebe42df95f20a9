#!/usr/bin/env bash
# The issue-15 measurements on one GPU host, in priority order, into one table (bench/results/epochs_h200),
# run from the repo root in the background (~25 min of one H200); each row is written as it ends.
# The rows come from: python bench/epochs.py prepare --out .carry/epochs (on a CPU).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --out /tmp/bgout/epochs_h200 --repeats-block 1"
# The loss yardstick, and the CUDA-graph step against the same recipe's eager step (50 steps each).
$E --jobs seed_epoch_b1 --recipes reference --variant graphs_50_steps:cuda_graphs=true \
  --variant eager_50_steps:cuda_graphs=false --steps 50
$E --jobs seed_epoch_b1 --recipes pipeline tutorial unsloth --append
$E --jobs epoch_b4 --recipes unsloth pipeline tutorial --append
$E --jobs block_2048x4 --recipes tutorial pipeline unsloth --append
