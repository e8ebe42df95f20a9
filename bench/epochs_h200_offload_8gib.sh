#!/usr/bin/env bash
# Issue 15, goal 4: the 7B config's 2048 x 4 blocks (every layer recomputed at its 8 GiB budget,
# eager: 8,192 tokens is over cuda_graphs_max_tokens) against the same with the checkpointed
# inputs offloaded and brought back ahead (offload_checkpoints, offload_prefetch): the plan then
# keeps two layers' activations (30 of 32 recomputed, predicted 7.43 GiB). Two runs each,
# interleaved. ~4 min from the repository root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_offload_8gib --append"
OFFLOADED="--jobs block_2048x4 --recipes --variant pipeline_offloaded:offload_checkpoints=true"
$E $O --jobs block_2048x4 --recipes pipeline
$E $O $OFFLOADED
$E $O --jobs block_2048x4 --recipes pipeline
$E $O $OFFLOADED
