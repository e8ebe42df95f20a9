#!/usr/bin/env bash
# The issue-15 measurements on one GPU host, in priority order, into one table (bench/results/epochs_h200),
# run from the repo root in the background (~25 min of one H200); each row is written as it ends.
# The rows come from: python bench/epochs.py prepare --out .carry/epochs (on a CPU).
set -u
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
rm -rf /tmp/proj /tmp/epochs && mkdir -p /tmp/proj /tmp/bgout && tar --exclude=./.carry -c . | tar -x -C /tmp/proj
cp -r .carry/epochs /tmp/epochs && cd /tmp/proj
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --out /tmp/bgout/epochs_h200 --repeats-block 1"
# The loss yardstick, and the CUDA-graph step against the same recipe's eager step (50 steps each).
$E --jobs seed_epoch_b1 --recipes reference --variant graphs_50_steps:cuda_graphs=true \
  --variant eager_50_steps:cuda_graphs=false --steps 50
$E --jobs seed_epoch_b1 --recipes pipeline tutorial unsloth --append
$E --jobs epoch_b4 --recipes unsloth pipeline tutorial --append
$E --jobs block_2048x4 --recipes tutorial pipeline unsloth --append
