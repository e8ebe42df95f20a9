#!/usr/bin/env bash
# Issue 15, the sitting after bench/epochs_h200_ahead_b1.sh, on one H200 with ~6 min of device
# time left: that sitting's recorder warmed up beside the run's first (eager) step, and the loop's
# first recording then failed at once in every recorded-ahead row ("operation failed due to a
# previous error during capture": graphs off, the epoch eager, 72-83 s at batch 4, 283 s at batch
# 1). Now the thread starts after the loop's first recording and warms up with the small calls
# beside the replays. One batch-4 epoch recorded ahead at multiples of 128 with the graph
# headroom 1.05 (its peak against 8 GiB), the first row on a fresh machine (no warm-up row: the
# Triton kernels compile in its first step); then the CUDA tests of the recorder.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
H105="pad128_ahead_h105:pad_to_multiple_of=128,cuda_graphs_capture=ahead,cuda_graphs_headroom=1.05"
python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1 --out /tmp/bgout/epochs_h200_ahead_started \
  --jobs epoch_b4 --recipes --variant "$H105"
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "recording_ahead or recorder" 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -40 | tee /tmp/bgout/pytest_cuda_ahead_started.txt
