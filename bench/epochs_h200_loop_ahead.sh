#!/usr/bin/env bash
# Issue 15, goal 2: the batch-4 epoch's start. The recorder thread lagged the loop at each of the
# first megabatch's shapes (2.0-2.4 s of waits, bench/results/epochs_h200_shipped); here the loop
# records the next one or two shapes itself, each while the GPU runs the replay it just launched
# (train.cuda_graphs_loop_ahead), and host threads wait for the GPU asleep instead of spinning
# (train.cuda_blocking_sync), on one H200. The GPU tests of both first; a 12-step warm-up of each
# recipe (Triton's kernels compile once per machine); then config/batch4.yaml as shipped, with loop
# ahead 1 and 2, against the tutorial's recipe, interleaved, twice; a third tutorial with the
# blocking-sync variants. ~20 min from the repo root (bg.sh start ... 540, then waits of 560).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_graph_recorder.py tests/test_train.py \
  -k "records_what_the_training_loop_records or blocking_sync" 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -30 | tee /tmp/bgout/pytest_cuda_loop_ahead.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_loop_ahead --append --jobs epoch_b4 --recipes"
OVERLAY="@config/batch4.yaml"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes tutorial --steps 12
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "batch4:$OVERLAY" --steps 12
for run in 1 2; do
  $E $B4 tutorial
  $E $B4 --variant "batch4:$OVERLAY"
  $E $B4 --variant "batch4_ahead1:$OVERLAY,cuda_graphs_loop_ahead=1"
  $E $B4 --variant "batch4_ahead2:$OVERLAY,cuda_graphs_loop_ahead=2"
done
$E $B4 tutorial
$E $B4 --variant "batch4_blocking:$OVERLAY,cuda_blocking_sync=true"
$E $B4 --variant "batch4_ahead1_blocking:$OVERLAY,cuda_graphs_loop_ahead=1,cuda_blocking_sync=true"
