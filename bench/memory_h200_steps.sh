#!/usr/bin/env bash
# Issue 15, goals 5 and 2. (1) The 4 x 640 variant's first 60 steps again with torch's allocation
# history, each step's allocations tagged with its number (bench/memory_peak.py): at its 8.089 GiB
# peak (bench/results/memory_h200_mixed) 96 lora_A outputs were alive where the model counts 16,
# some of them 4 x 1,024 blocks in a 4 x 896 step; which steps made them. (2) The batch-4 epoch
# against the tutorial's on this machine: config/batch4.yaml twice around the tutorial after a
# 12-step warm-up (Triton's disk cache). ~10 min from the repository root in the background over
# two calls (.carry/bench/bg.sh).
NAME=${1:-memory_h200_steps}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
$E --out /tmp/bgout/$NAME --jobs epoch_b4 --steps 60 --memory-history \
  --recipes --variant "eager_over_640:@config/batch4.yaml,cuda_graphs_max_tokens=2560"
B4="--out /tmp/bgout/epochs_h200_goal2 --append --jobs epoch_b4 --recipes"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes --variant "batch4:@config/batch4.yaml" --steps 12
$E $B4 --variant "batch4:@config/batch4.yaml"
$E $B4 tutorial
$E $B4 --variant "batch4:@config/batch4.yaml"
