#!/usr/bin/env bash
# Issue 15, on one H200: recording ahead on a thread (train.cuda_graphs_capture: ahead,
# scripts/graph_recorder.py), each background recording with a generator state of its own (torch
# 2.11 refused a replay during another thread's capture: bench/results/epochs_h200_ahead). The
# capture sitting (bench/results/epochs_h200_capture) found the host never more than a step ahead
# (cudaGraphLaunch waits for the previous launch of its graph): a recording in the training loop
# leaves the card idle. Rows: the CUDA tests, a 10-step warm-up, batch-4 epochs at multiples of
# 128 recorded ahead and in the loop, the
# tutorial's. ~6 min from the repo root in the background; stops after the tests if one fails.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
[ "${SKIP_TESTS:-0}" = 1 ] || python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "recording_ahead or never_wait or attention_kernel" \
  2>&1 | grep -E "^E|passed|failed|Error" | head -40 | tee /tmp/bgout/pytest_cuda_recorder.txt
grep -q " failed" /tmp/bgout/pytest_cuda_recorder.txt && exit 1
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_recorder --append"
# (the third sitting ran the rows alone, time short: no tests, no warm-up, so the recorded-
# ahead row compiled the Triton kernels the others found cached; the tutorial's before the last)
$E $O --jobs epoch_b4 --recipes --variant "pad128_ahead:pad_to_multiple_of=128,cuda_graphs_capture=ahead"
$E $O --jobs epoch_b4 --recipes tutorial
$E $O --jobs epoch_b4 --recipes --variant "pad128:pad_to_multiple_of=128"
