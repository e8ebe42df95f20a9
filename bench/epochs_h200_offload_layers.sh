#!/usr/bin/env bash
# Issue 15, goal 4: whole layers whose saved activations wait in host memory instead of being
# recomputed (train.offload_layers, scripts/layer_offload.py), on the 7B config's 2,048 x 4
# blocks at its 8 GiB budget on one H200. The plan with offloaded inputs recomputes layers 0-28;
# offload_layers 3 keeps 0, 3, ..., 27 whole (10 layers, 19 recomputed), 2 keeps 0, 2, ..., 28
# (15, 14 recomputed); without offloaded inputs, 3 keeps 0, 3, ..., 30 of 0-30 (11, 20). A warm-up
# block run first (Triton's kernels compiled), then the four rows interleaved, twice, each a fresh
# process. ~7 min from the repository root in the background over two calls.
NAME=${1:-epochs_h200_offload_layers}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
BLOCKS="--out /tmp/bgout/$NAME --append --jobs block_2048x4 --recipes"
$E --out /tmp/warmup_h200 --jobs block_2048x4 --recipes --variant warmup:offload_checkpoints=true,offload_layers=3
for run in 1 2; do
  $E $BLOCKS --variant offloaded:offload_checkpoints=true
  $E $BLOCKS --variant offloaded_layers3:offload_checkpoints=true,offload_layers=3
  $E $BLOCKS --variant offloaded_layers2:offload_checkpoints=true,offload_layers=2
  $E $BLOCKS --variant layers3:offload_layers=3
done
