#!/usr/bin/env bash
# Issue 15, goal 2: two coarse levels for config/batch4.yaml's first batches. In the batch-4
# sittings the loop waited 2.1-2.8 s for the recorder thread, all in the first megabatch, where
# 7 new shapes (multiples of 128) arrive within 50 steps and the thread records one in ~1.3 s. A
# replay of the epoch's step times (bench/coarse_levels.py, from epochs_h200_batch4's rows)
# reproduces the shipped epoch (41.2 s, 2.8 s of waits; measured 41.35 and 41.80 s, 2.8 s) and
# predicts 39.5 s with no waits for multiples of 256 up to batch 50 and of 128 up to batch 150,
# for recordings of 1.0-1.6 s each. One short sitting (a fresh machine, ~5 min): a 12-step
# warm-up, then the two levels and the overlay as shipped, one epoch each; no tutorial rows, so
# a within-sitting comparison only. From the repo root, in the background (bg.sh start ... 280).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_coarse_levels --append --jobs epoch_b4 --recipes"
LEVELS="cuda_graphs_coarse_multiple=[256,128],cuda_graphs_coarse_steps=[50,150]"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes --variant "batch4:@config/batch4.yaml" --steps 12
$E $B4 --variant "batch4_levels_256_128:@config/batch4.yaml,$LEVELS"
$E $B4 --variant "batch4:@config/batch4.yaml"
