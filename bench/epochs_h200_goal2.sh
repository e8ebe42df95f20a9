#!/usr/bin/env bash
# Issue 15, goal 2: the batch-4 epoch against the tutorial's on one H200 with the code as it is
# (config/batch4.yaml twice around the tutorial recipe, after a 12-step warm-up for Triton's disk
# cache). ~6 min from the repository root in the background (.carry/bench/bg.sh).
NAME=${1:-epochs_h200_goal2_cast}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/$NAME --append --jobs epoch_b4 --recipes"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes --variant "batch4:@config/batch4.yaml" --steps 12
$E $B4 --variant "batch4:@config/batch4.yaml"
$E $B4 tutorial
$E $B4 --variant "batch4:@config/batch4.yaml"
