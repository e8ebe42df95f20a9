#!/usr/bin/env bash
# Issue 15, goal 5: where the peak of the 7B config's 2,048 x 4 blocks sits with whole layers in
# host memory (train.offload_layers). With offloaded inputs too it reached 8.077 GiB at an 8 GiB
# budget, predicted 7.668 (bench/results/epochs_h200_offload_layers_2): the plan counts an offloaded
# layer as a recomputed one. Each row with torch's allocation history (bench/memory_peak.py: what
# was alive at the peak by allocation site, and the allocation that set it): offloaded inputs and
# every 3rd recomputed layer offloaded; the shipped 7B config (every 3rd, inputs on the device);
# offloaded inputs alone. Each a fresh process, ~5 min from the repository root.
NAME=${1:-epochs_h200_offload_peak}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
BLOCKS="--out /tmp/bgout/$NAME --append --jobs block_2048x4 --memory-history --recipes"
$E $BLOCKS --variant offloaded_layers3:offload_checkpoints=true,offload_layers=3
$E $BLOCKS --variant layers3:offload_layers=3
$E $BLOCKS --variant offloaded:offload_checkpoints=true
