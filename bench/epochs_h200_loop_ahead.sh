#!/usr/bin/env bash
# Issue 15, goal 2: the batch-4 epoch's start. The recorder thread lagged the loop at each of the
# first megabatch's shapes (2.0-2.4 s of waits, bench/results/epochs_h200_shipped); here the loop
# records the next one or two shapes itself, each while the GPU runs the replay it just launched
# (train.cuda_graphs_loop_ahead), on one H200. A 12-step warm-up of each recipe (Triton's kernels
# compile once per machine); then config/batch4.yaml as it was, with loop ahead 1 and 2, against
# the tutorial's recipe, interleaved, twice. As run, the sitting also ran a third tutorial and two
# rows with the host's waits for the GPU asleep instead of spinning (a train.cuda_blocking_sync
# setting, CU_CTX_SCHED_BLOCKING_SYNC on the context: slower, removed after it; the results' command
# lists them) and a pytest call that failed to collect (no snakemake on the host:
# bench/pytest_h200_loop_ahead.sh ran the tests). ~15 min from the repo root (bg.sh start ... 540).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_loop_ahead --append --jobs epoch_b4 --recipes"
OVERLAY="@config/batch4.yaml,cuda_graphs_loop_ahead=0"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes tutorial --steps 12
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "batch4:$OVERLAY" --steps 12
for run in 1 2; do
  $E $B4 tutorial
  $E $B4 --variant "batch4:$OVERLAY"
  $E $B4 --variant "batch4_ahead1:$OVERLAY,cuda_graphs_loop_ahead=1"
  $E $B4 --variant "batch4_ahead2:$OVERLAY,cuda_graphs_loop_ahead=2"
done
