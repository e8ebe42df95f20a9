#!/usr/bin/env bash
# Issue 15: the shipped configs as they stand (the recorded steps' causal attention and
# sync_free_forward since the batch-1 rows were measured), on one H200, and whether freeing memory
# at the same 8 GiB budget lets batch 4 recompute fewer layers fast enough to pay. The batch-4 epoch
# (config/batch4.yaml) against the tutorial's twice, interleaved with two variants of it: the
# checkpointed layers' inputs in pinned host memory (offload_checkpoints, exact) and that with
# double quantisation (0.30 GiB of absmax less, other weights); then the batch-1 epoch (the 7B
# config) twice around the tutorial's. ~17 min from the repo root (bg.sh start ... 540, then waits).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1 --out /tmp/bgout/epochs_h200_shipped --append"
B4="$E --jobs epoch_b4 --recipes"
B1="$E --jobs seed_epoch_b1 --recipes"
OFF="@config/batch4.yaml,offload_checkpoints=true"
for run in 1 2; do
  $B4 tutorial
  $B4 --variant "batch4:@config/batch4.yaml"
  $B4 --variant "batch4_offload:$OFF"
done
$B4 --variant "batch4_offload_dq:$OFF,double_quant=true"
$B1 pipeline
$B1 tutorial
$B1 pipeline
