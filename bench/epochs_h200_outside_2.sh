#!/usr/bin/env bash
# Issue 15, goal 2, the same day as bench/epochs_h200_outside.sh, on another H200: the tutorial's
# recipe once and config/batch4.yaml twice, now with the trainer's wrap-up after its epoch split out
# of outside_steps and each full collection of Python's collector timed from the start of training
# (is the 0.4-0.6 s after the last step a collection?); and once with cuda_graphs_headroom 1.035
# (the plan's headroom for a recording, 1.05 shipped: the measured peak was 1.032 times the plan's
# largest prediction). A 12-step warm-up of each recipe first. ~9 min (bg.sh start ... 540).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_outside_2 --append --jobs epoch_b4 --recipes"
OVERLAY="@config/batch4.yaml"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes tutorial --steps 12
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "batch4:$OVERLAY" --steps 12
$E $B4 tutorial
$E $B4 --variant "batch4:$OVERLAY"
$E $B4 --variant "batch4_headroom1035:$OVERLAY,cuda_graphs_headroom=1.035"
$E $B4 --variant "batch4:$OVERLAY"
