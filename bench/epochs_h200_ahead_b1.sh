#!/usr/bin/env bash
# Issue 15, prepared for the next sitting on one H200 (not yet run): the recorder's thread now
# warms up with small cuBLAS/cuDNN calls beside the loop's first step, without the lock
# (graph_recorder.warm_up_libraries), instead of a model forward under the lock after the loop's
# first recording, which left it behind the loop at steps 8, 11 and 15 of the batch-4 epoch
# (bench/results/epochs_h200_recorder_event: the loop waited 1.75-2.29 s). The CUDA tests say
# whether the small calls are warm-up enough (the recorder's first capture failed without one);
# the batch-4 rows' step times whether the thread now keeps ahead. And two questions the
# recorder's sittings left (bench/results/epochs_h200_recorder_warm, epochs_h200_recorder_event):
# 1. Should the 7B config record ahead? Its job is batch 1 (16 shapes at multiples of 64, 7.3 s of
#    recordings in the loop in bench/results/epochs_h200_b1_layers): the seed's epoch recorded in
#    the loop and ahead, in one sitting.
# 2. Batch 4 at multiples of 128 recorded ahead against the tutorial's, each twice interleaved:
#    the tutorial's epoch varied 110.8-130.1 s between sittings, so one run of it is not enough
#    for the 3x question.
# 3. The graph headroom (train.cuda_graphs_headroom): 1.05 instead of 1.08 recomputes 12 fewer
#    layers over the eight shapes at multiples of 128 (16.8 -> 15.0 a step on average over the
#    epoch), every shape still expected within 8 GiB; measured recorded peaks ran 1.023-1.048x
#    the model's prediction. Is it faster, and does the peak stay under 8 GiB?
# Rows after the CUDA tests and a 30-step warm-up; ~20 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "recording_ahead or never_wait or recorder_runs or never_started" 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -40 | tee /tmp/bgout/pytest_cuda_ahead_b1.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B1="--out /tmp/bgout/epochs_h200_ahead_b1 --append --jobs seed_epoch_b1 --recipes"
B4="--out /tmp/bgout/epochs_h200_ahead_b4 --append --jobs epoch_b4 --recipes"
AHEAD="pad128_ahead:pad_to_multiple_of=128,cuda_graphs_capture=ahead"
$E --out /tmp/bgout/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $B1 pipeline
$E $B1 --variant "ahead:cuda_graphs_capture=ahead"
H105="pad128_ahead_h105:pad_to_multiple_of=128,cuda_graphs_capture=ahead,cuda_graphs_headroom=1.05"
$E $B4 tutorial
$E $B4 --variant "$AHEAD"
$E $B4 --variant "$H105"
$E $B4 tutorial
$E $B4 --variant "$AHEAD"
$E $B4 --variant "$H105"
# 4. Does the loop's event wait (cudaEventSynchronize) leave the thread's launches alone, as
#    cudaGraphLaunch did not (bench/results/profile_recorder_h200)? Steps 6-9 with the recorder.
python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 14 --profile-from 5 \
  --variants pad128_ahead_log10 --trace-dir /tmp/traces --out /tmp/bgout/profile_recorder_event_h200.json
tar -C /tmp -czf /tmp/bgout/traces_recorder_event_h200.tgz traces
