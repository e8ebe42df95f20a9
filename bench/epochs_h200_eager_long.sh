#!/usr/bin/env bash
# Issue 15, goal 2: the batch-4 epoch with its long batches trained eagerly instead of recorded.
# config/batch4.yaml records every guanaco batch (cuda_graphs_max_tokens 4,096), so no step can keep
# a layer in host memory (layer offloading runs in eager steps only): at 4 x 1,024 the plan
# recomputes 28 layers where an eager step recomputes 18 and offloads 9 (memory model revision 4),
# and the epoch's first megabatch starts by recording the longest shapes. Here the batches over
# 4 x 640 (or 4 x 768) tokens train eagerly, offloading; the rest are recorded ahead as shipped.
# One H200, after a 12-step warm-up (Triton's disk cache), config/batch4.yaml and the two limits
# interleaved around the tutorial recipe's epoch. ~10 min from the repository root in the
# background over two calls (.carry/bench/bg.sh).
NAME=${1:-epochs_h200_eager_long}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/$NAME --append --jobs epoch_b4 --recipes"
SHIPPED="batch4:@config/batch4.yaml"
OVER_640="eager_over_640:@config/batch4.yaml,cuda_graphs_max_tokens=2560"
OVER_768="eager_over_768:@config/batch4.yaml,cuda_graphs_max_tokens=3072"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes --variant "$SHIPPED" --steps 12
$E $B4 --variant "$SHIPPED"
$E $B4 --variant "$OVER_640"
$E $B4 --variant "$OVER_768"
$E $B4 tutorial
$E $B4 --variant "$OVER_768"
$E $B4 --variant "$OVER_640"
$E $B4 --variant "$SHIPPED"
