#!/usr/bin/env bash
# Issue 15: the recorded step's causal attention and the eager step's forward without host syncs,
# on one H200. The block idle profile (profile_step_h200_block_idle.json) found (1) the recorded
# 2048 x 4 step's attention 3.2x the eager one's: under a stream capture transformers could not
# read the model's own position ids and built a causal mask tensor (graph_attention.causal_rows
# now decides as eager); (2) the eager step's card idle after host syncs.
# train.sync_free_forward (on in the 7B config) calls an eager forward as a recorded one: no mask
# read, TRL's head over every position. First the eager block step's synchronizing calls by Python
# line without and with it (bench/sync_sites.py, no profiler); then the 7B config's blocks without
# it, with it, and every block recorded, twice each, interleaved; then the batch-4 epoch
# (config/batch4.yaml, both changes) against the tutorial's twice, interleaved; last the
# recorded block step's profile. ~15 min from the repo root (bg.sh start ... 540, waits of 560).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
P="python3 bench/profile_step.py --lengths /tmp/epochs/lengths_b4_order.json --block 2048 --batch 4 --steps 14"
$P --profile-from 6 --variants syncing base --sync-sites --out /tmp/bgout/profile_step_h200_block_syncs.json
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
BL="--out /tmp/bgout/epochs_h200_causal --append --jobs block_2048x4 --recipes"
B4="--out /tmp/bgout/epochs_h200_causal --append --jobs epoch_b4 --recipes"
$E $BL --variant "blocks_syncing:sync_free_forward=false"
$E $BL pipeline
$E $BL --variant "blocks_recorded:cuda_graphs_max_tokens=null"
$E $BL --variant "blocks_syncing:sync_free_forward=false"
$E $BL pipeline
$E $BL --variant "blocks_recorded:cuda_graphs_max_tokens=null"
$E $B4 tutorial
$E $B4 --variant "batch4:@config/batch4.yaml"
$E $B4 tutorial
$E $B4 --variant "batch4:@config/batch4.yaml"
$P --profile-from 6 --variants graphs_all --out /tmp/bgout/profile_step_h200_block_recorded_causal.json
