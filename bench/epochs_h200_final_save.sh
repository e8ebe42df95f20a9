#!/usr/bin/env bash
# Issue 15, goal 2, a third H200 the same day: config/batch4.yaml and the tutorial's recipe once each
# after the trainer's checkpoint at the end of training was dropped for both (the train stage deleted
# it; the 2023 tutorial's trainer did not write it): 0.42-0.59 s of each epoch in
# bench/results/epochs_h200_outside*. A 12-step warm-up of batch4 first (Triton's kernels compile
# once per machine; the tutorial's recipe has none). ~5 min (the time left in the sitting).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_final_save --append --jobs epoch_b4 --recipes"
OVERLAY="@config/batch4.yaml"
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "batch4:$OVERLAY" --steps 12
$E $B4 --variant "batch4:$OVERLAY"
$E $B4 tutorial
