#!/usr/bin/env bash
# Issue 15, goal 4: train.offload_layers on the 7B config as it ships (inputs not offloaded) at its
# 8 GiB budget, 2,048 x 4 blocks on one H200: the plan's 31 recomputed layers (0-30), every 3rd kept
# whole and offloaded (0, 3, ..., 30: 11, 20 recomputed), every 4th (0, 4, ..., 28: 8, 23). A
# warm-up block run, then the rows interleaved, twice, each a fresh process (~7 min).
NAME=${1:-epochs_h200_offload_layers_3}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
BLOCKS="--out /tmp/bgout/$NAME --append --jobs block_2048x4 --recipes"
$E --out /tmp/warmup_h200 --jobs block_2048x4 --recipes --variant warmup:offload_layers=3
for run in 1 2; do
  $E $BLOCKS pipeline
  $E $BLOCKS --variant layers3:offload_layers=3
  $E $BLOCKS --variant layers4:offload_layers=4
done
