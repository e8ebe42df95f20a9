#!/usr/bin/env bash
# Issue 15, on one H200: recording ahead with the loop waiting for its previous replay on an event
# while the recorder runs. The warm sitting before (bench/results/epochs_h200_recorder_warm,
# profile_recorder_h200) found the thread's captured launches stalled as long as the loop sat in
# cudaGraphLaunch (~270 ms a 4 x 1024 step: the launch waits for the previous replay of its graph
# holding the driver), so a background recording took 1.0-1.4 s against 0.5-0.8 s in the loop and
# the loop waited at almost every new shape. A background capture waits for the card again
# (torch.cuda.graph): the first try of this sitting, without it, failed the dropout test's
# reproducibility (two runs' last losses 5e-6 apart), and the capture was no faster without it.
# Rows: the CUDA tests (the epochs run whatever they say), a 30-step warm-up, batch-4 epochs at
# multiples of 128 recorded ahead, the tutorial's, multiples of 64 recorded ahead, 128 ahead
# again. ~10 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "recording_ahead or never_wait" 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -40 | tee /tmp/bgout/pytest_cuda_recorder_event.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_recorder_event --append"
AHEAD="pad128_ahead:pad_to_multiple_of=128,cuda_graphs_capture=ahead"
$E --out /tmp/bgout/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $O --jobs epoch_b4 --recipes --variant "$AHEAD"
$E $O --jobs epoch_b4 --recipes tutorial
$E $O --jobs epoch_b4 --recipes --variant "pad64_ahead:pad_to_multiple_of=64,cuda_graphs_capture=ahead"
$E $O --jobs epoch_b4 --recipes --variant "$AHEAD"
