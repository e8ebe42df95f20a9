#!/usr/bin/env bash
# Issue 15, eleventh run on one H200 (bench/results/epochs_h200_layers), after
# bench/epochs_h200_queued.sh: train.checkpoint_plan layers (the fewest layers that fit the 8 GiB
# budget, the lowest ones) against every (layers 0, k, 2k, ...: a batch-4 epoch recomputed all 32
# layers in 132 of 250 steps where 21-29 fit). Rows: a 30-step warm-up (the Triton kernels compiled
# before the measured rows), then batch-4 epochs at multiples of 128 with each plan, the tutorial's,
# and the 7B config (multiples of 64, layers plan); last, a profile of recorded 4 x 512 steps under
# the layers plan. ~9 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_layers --append"
$E --out /tmp/bgout/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $O --jobs epoch_b4 --recipes --variant "pad128:pad_to_multiple_of=128"
$E $O --jobs epoch_b4 --recipes tutorial
$E $O --jobs epoch_b4 --recipes --variant "pad128_every:pad_to_multiple_of=128,checkpoint_plan=every"
$E $O --jobs epoch_b4 --recipes pipeline
python3 bench/profile_step.py --batch 4 --steps 14 --profile-from 6 --block 512 --variants base \
  --out /tmp/bgout/profile_step_h200_b4_512_layers.json
