#!/usr/bin/env bash
# Issue 15, prepared for the next sitting on one H200 (not yet run): the questions
# bench/epochs_h200_ahead_b1.sh meant to answer and could not (its recorder warmed up beside the
# first eager step and the loop's first recording failed: every recorded-ahead row ran eagerly).
# Since commit 8caf6a7 the thread starts after the loop's first recording and warms up beside the
# replays with small cuBLAS/cuDNN calls; on a fresh machine it then recorded 7 of 8 shapes
# (bench/results/epochs_h200_ahead_started), but no warm epoch of it exists.
# 1. Should the 7B config record ahead? Its job is batch 1 (16 shapes at multiples of 64): the
#    seed's epoch recorded in the loop and ahead, in one sitting.
# 2. Batch 4 at multiples of 128 recorded ahead (the thread's new start) against recorded in the
#    loop and the tutorial's, the tutorial and ahead twice, interleaved (the tutorial's epoch
#    varied 113.8-130.1 s between and within sittings).
#    And multiples of 64 recorded ahead, once: the steps' time is ~13.2k tok/s at every batch
#    shape after step 60 (epochs_h200_recorder_event), so padding is time: 7.6 % of the tokens
#    at 64 against 13.6 % at 128, if the thread now keeps up with 16 shapes in the first 50 steps
#    (it did not: the loop waited ~6 s).
# 3. The profile of steps 6-9 with the recorder beside the loop's event wait (the one prepared in
#    the last sitting profiled eager steps).
# Rows after the CUDA tests and a 30-step warm-up; ~19 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "recording_ahead or recorder" 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -40 | tee /tmp/bgout/pytest_cuda_ahead_warm.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B1="--out /tmp/bgout/epochs_h200_ahead_warm_b1 --append --jobs seed_epoch_b1 --recipes"
B4="--out /tmp/bgout/epochs_h200_ahead_warm_b4 --append --jobs epoch_b4 --recipes"
AHEAD="pad128_ahead:pad_to_multiple_of=128,cuda_graphs_capture=ahead"
$E --out /tmp/bgout/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $B1 pipeline
$E $B1 --variant "ahead:cuda_graphs_capture=ahead"
$E $B4 tutorial
$E $B4 --variant "$AHEAD"
$E $B4 --variant "pad128:pad_to_multiple_of=128"
$E $B4 tutorial
$E $B4 --variant "$AHEAD"
$E $B4 --variant "pad64_ahead:pad_to_multiple_of=64,cuda_graphs_capture=ahead"
python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 14 --profile-from 5 \
  --variants pad128_ahead_log10 --trace-dir /tmp/traces --out /tmp/bgout/profile_recorder_event_h200_2.json
tar -C /tmp -czf /tmp/bgout/traces_recorder_event_h200_2.tgz traces/trace_profile_recorder_event_h200_2_pad128_ahead_log10.json.gz
