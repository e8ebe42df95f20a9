#!/usr/bin/env bash
# Issue 15, goals 4 and 5: train.offload_layers after its first sitting (bench/epochs_h200_offload_layers.sh),
# the offloaded tensors now kept until the compute stream has waited for their copies (no
# record_stream: the peak counts them, and the allocator reuses their memory in stream order).
# The 7B config's 2,048 x 4 blocks at 8 GiB with offloaded inputs: the plan's 29 recomputed, every
# 3rd of them kept whole and offloaded (10, 19 recomputed), every 4th (8, 21). A warm-up block run,
# then the rows interleaved, twice, each a fresh process, then one without offloaded inputs.
NAME=${1:-epochs_h200_offload_layers_2}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
BLOCKS="--out /tmp/bgout/$NAME --append --jobs block_2048x4 --recipes"
$E --out /tmp/warmup_h200 --jobs block_2048x4 --recipes --variant warmup:offload_checkpoints=true,offload_layers=3
for run in 1 2; do
  $E $BLOCKS --variant offloaded:offload_checkpoints=true
  $E $BLOCKS --variant offloaded_layers3:offload_checkpoints=true,offload_layers=3
  $E $BLOCKS --variant offloaded_layers4:offload_checkpoints=true,offload_layers=4
done
$E $BLOCKS --variant layers3:offload_layers=3
