#!/usr/bin/env bash
# Issue 15, on one H200: recording ahead measured in a warm sitting, beside the loop's recordings.
# Its one epoch before (bench/results/epochs_h200_recorder, 51.3 s) was the sitting's first row
# without warm-up and had no loop-recorded row beside it; since, the thread starts after the
# loop's first recording, every recording draws from a state seeded by its shape, and a
# background capture no longer waits for the GPU and flushes the caches first
# (cuda_graphs.capture_at_once). Rows: the CUDA tests (stop if one fails), a 30-step warm-up,
# batch-4 epochs at multiples of 128 recorded in the loop and ahead, twice each interleaved, the
# tutorial's between them, multiples of 64 recorded ahead (16 shapes, 7.6 % padding against
# 13.6 %); then steps 6-9 of the epoch's order profiled with the recorder. ~15 min from the repo
# root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "recording_ahead or never_wait" 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -40 | tee /tmp/bgout/pytest_cuda_recorder_warm.txt
grep -q " failed" /tmp/bgout/pytest_cuda_recorder_warm.txt && exit 1
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_recorder_warm --append"
LOOP="pad128:pad_to_multiple_of=128"
AHEAD="pad128_ahead:pad_to_multiple_of=128,cuda_graphs_capture=ahead"
$E --out /tmp/bgout/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $O --jobs epoch_b4 --recipes --variant "$LOOP"
$E $O --jobs epoch_b4 --recipes --variant "$AHEAD"
$E $O --jobs epoch_b4 --recipes tutorial
$E $O --jobs epoch_b4 --recipes --variant "$AHEAD"
$E $O --jobs epoch_b4 --recipes --variant "$LOOP"
$E $O --jobs epoch_b4 --recipes --variant "pad64_ahead:pad_to_multiple_of=64,cuda_graphs_capture=ahead"
python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 14 --profile-from 5 \
  --variants pad128_ahead_log10 --trace-dir /tmp/traces --out /tmp/bgout/profile_recorder_h200.json
tar -C /tmp -czf /tmp/bgout/traces_recorder_h200.tgz traces
