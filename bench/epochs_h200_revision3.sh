#!/usr/bin/env bash
# Issue 15, goal 5: revision 3 of the memory model on one H200. Layers offloaded to the host
# (train.offload_layers) keep no input on the device, and such a plan peaks in the forward, the last
# offloaded layer's tensors beside the whole layers (bench/results/epochs_h200_offload_peak). The 7B
# config's 2,048 x 4 blocks at 8 GiB with offloaded inputs: revision 2 planned 29 layers off the
# device (10 offloaded, 19 recomputed) and reached 8.077 GiB, predicted 7.668; revision 3 predicts
# that plan at 8.102 and plans 30 (10 offloaded, 20 recomputed) at 7.327. The 7B config as it ships
# (inputs on the device) keeps its plan (31: 11 offloaded, 20 recomputed), now predicted 7.668
# (measured 7.766). Both interleaved, twice, each a fresh process; ~6 min from the repository root.
NAME=${1:-epochs_h200_revision3}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
BLOCKS="--out /tmp/bgout/$NAME --append --jobs block_2048x4 --recipes"
for run in 1 2; do
  $E $BLOCKS pipeline
  $E $BLOCKS --variant offloaded:offload_checkpoints=true
done
