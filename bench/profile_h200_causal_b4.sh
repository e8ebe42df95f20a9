#!/usr/bin/env bash
# Issue 15, after epochs_h200_causal: (1) the recorded batch-4 step's attention with
# graph_attention.causal_rows, at 4 x 1,024 (the batch-4 epoch's longest shape): eager against
# recorded in one call (before the fix: 0.050 against 0.349 s over 4 steps,
# profile_step_h200_b4_1024.json); (2) the card's clocks and power while the 2048 x 4 block step
# runs eager and recorded (nvidia-smi every 200 ms): whether the busier recorded step runs at a
# lower clock. From the repo root with .carry/bench and .carry/epochs carried: ~4 min.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
nvidia-smi --query-gpu=power.limit,power.max_limit,clocks.max.sm --format=csv > /tmp/bgout/smi_limits.csv
P="python3 bench/profile_step.py --batch 4 --steps 14 --profile-from 6"
$P --block 1024 --variants eager base --out /tmp/bgout/profile_step_h200_b4_1024_causal.json
Q="timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu"
(nvidia-smi --query-gpu=$Q,clocks_event_reasons.active --format=csv -lms 200 \
  || nvidia-smi --query-gpu=$Q --format=csv -lms 200) > /tmp/bgout/smi_blocks.csv 2>&1 &
SMI=$!
$P --block 2048 --profile-from 100 --variants base graphs_all --out /tmp/bgout/profile_step_h200_block_clocks.json
kill $SMI
