#!/usr/bin/env bash
# Issue 15, goal 2: train.cuda_graphs_pad_up on one H200 (ran at ffd52cc: bench/results/epochs_h200_pad_up; it did
# not pay and was removed, so this script no longer runs as it stands). A batch whose shape
# the recorder thread has not recorded yet replays the shortest recorded shape that holds it (up to its
# coarse shape) instead of waiting: config/batch4.yaml waited 0.3-0.7 s for the thread and padded to
# multiples of 32 it waited 7.25 s (bench/results/epochs_h200_outside). A 12-step warm-up of each
# recipe, then interleaved, twice: the tutorial's recipe, config/batch4.yaml as shipped, with pad_up,
# and with pad_up at multiples of 32 (29 shapes; 3.9 % fewer padded tokens if all were recorded).
# ~19 min from the repo root in two calls (bg.sh start ... 540, then bg.sh wait 560).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_pad_up --append --jobs epoch_b4 --recipes"
OVERLAY="@config/batch4.yaml"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes tutorial --steps 12
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "batch4:$OVERLAY" --steps 12
for run in 1 2; do
  $E $B4 tutorial
  $E $B4 --variant "batch4:$OVERLAY"
  $E $B4 --variant "batch4_pad_up:$OVERLAY,cuda_graphs_pad_up=true"
  $E $B4 --variant "batch4_pad32_up:$OVERLAY,pad_to_multiple_of=32,cuda_graphs_pad_up=true"
done
