#!/usr/bin/env bash
# Issue 15, goal 2 on a second H200: the epoch half of bench/epochs_h200_revision2.sh (revision 2
# of the memory model's plans; config/batch4.yaml against the tutorial's recipe, a 12-step warm-up
# of each, then interleaved, twice, each a fresh process). ~9 min from the repository root in the
# background over two calls.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_revision2_b4 --append --jobs epoch_b4 --recipes"
OVERLAY="@config/batch4.yaml"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes tutorial --steps 12
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "batch4:$OVERLAY" --steps 12
for run in 1 2; do
  $E $B4 tutorial
  $E $B4 --variant "batch4:$OVERLAY"
done
