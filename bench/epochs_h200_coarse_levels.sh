#!/usr/bin/env bash
# Issue 15, goal 2: two coarse levels for config/batch4.yaml's first batches. Ran on one H200 at
# commit abb1b4a (the record of that sitting: bench/results/epochs_h200_coarse_levels), where
# train.cuda_graphs_coarse_multiple/_steps took lists; reverted after it (no gain shown), so the
# first variant does not run at later commits. In the batch-4 sittings the loop waited 2.1-2.8 s
# for the recorder thread, all in the first megabatch, where 7 new shapes (multiples of 128) arrive
# within 50 steps and the thread records one in ~1.3 s. A replay of the epoch's step times from
# epochs_h200_batch4's rows reproduced the shipped epoch (41.2 s, 2.8 s of waits) and predicted
# 39.5 s without waits for multiples of 256 up to batch 50 and of 128 up to batch 150. Measured:
# the waits went (0.29 against 2.22 s) but the epoch only 0.23 s shorter (40.23 against 40.46 s,
# one run each): the padding cost ~1.3 s, and the shipped run's waits overlapped the card's
# queued work. A fresh machine: a 12-step warm-up, then the two levels and the overlay as shipped,
# one epoch each; no tutorial rows (a within-sitting comparison only); ~4 min in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_coarse_levels --append --jobs epoch_b4 --recipes"
LEVELS="cuda_graphs_coarse_multiple=[256,128],cuda_graphs_coarse_steps=[50,150]"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes --variant "batch4:@config/batch4.yaml" --steps 12
$E $B4 --variant "batch4_levels_256_128:@config/batch4.yaml,$LEVELS"
$E $B4 --variant "batch4:@config/batch4.yaml"
