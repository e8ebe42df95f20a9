#!/usr/bin/env bash
# Issue 15, goal 2: the batch-4 epoch against the tutorial's on one H200 with the code as it is,
# each recipe twice and interleaved (config/batch4.yaml, tutorial, config/batch4.yaml, tutorial)
# after a 12-step warm-up for Triton's disk cache, so that both sides of the ratio are medians.
# ~8 min from the repository root in the background (.carry/bench/bg.sh).
NAME=${1:-epochs_h200_goal2_median}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/$NAME --append --jobs epoch_b4 --recipes"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes --variant "batch4:@config/batch4.yaml" --steps 12
for _ in 1 2; do
  $E $B4 --variant "batch4:@config/batch4.yaml"
  $E $B4 tutorial
done
