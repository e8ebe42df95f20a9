#!/usr/bin/env bash
# Issue 15, goals 2, 4 and 5: revision 2 of the memory model (a recomputed layer's activations
# beside the whole layers below it only) on one H200. Its plans keep more layers whole at the
# same budget: config/batch4.yaml's epoch recomputes 13.42 layers a step against revision 1's
# 14.24; the 7B config's 2,048 x 4 blocks 31 of 32 (revision 1: 32) and with offloaded inputs 29
# (30). A 12-step warm-up of each epoch recipe, then the tutorial's recipe and config/batch4.yaml,
# interleaved, twice; then the blocks and the offloaded blocks, interleaved, twice. Each a fresh
# process. ~12 min from the repository root in the background over two calls.
# Arguments (bench/epochs_h200_revision2_b4.sh): the results' name, and "epochs" for the epochs only.
NAME=${1:-epochs_h200_revision2} ONLY=${2:-all}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/$NAME --append --jobs epoch_b4 --recipes"
BLOCKS="--out /tmp/bgout/${NAME}_blocks --append --jobs block_2048x4 --recipes"
OVERLAY="@config/batch4.yaml"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes tutorial --steps 12
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "batch4:$OVERLAY" --steps 12
for run in 1 2; do
  $E $B4 tutorial
  $E $B4 --variant "batch4:$OVERLAY"
done
[ "$ONLY" = epochs ] && exit 0
for run in 1 2; do
  $E $BLOCKS pipeline
  $E $BLOCKS --variant pipeline_offloaded:offload_checkpoints=true
done
