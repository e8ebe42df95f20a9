#!/usr/bin/env bash
# Issue 15, goal 5: the batch-4 epoch with its batches over 4 x 640 eager (layers offloaded) beside
# recorded graphs of the shorter ones peaked at 8.089 GiB where its plan expected 7.99, at step 56
# (4 x 896), after the short shapes' graphs were recorded (bench/results/epochs_h200_eager_long).
# With torch's allocation history, what is alive at that peak: its first 60 steps.
# ~3 min from the repository root in the background (.carry/bench/bg.sh).
NAME=${1:-memory_h200_mixed}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1 --out /tmp/bgout/$NAME --jobs epoch_b4 \
  --recipes --variant "eager_over_640:@config/batch4.yaml,cuda_graphs_max_tokens=2560" --steps 60 --memory-history
