#!/usr/bin/env bash
# Issue 15, one H200 (run once, at commit ef2d901; ahead_padded was removed after it: slower, see
# bench/results/epochs_h200_padded_b4): train.cuda_graphs_capture ahead_padded. In bench/results/epochs_h200_gc_b4
# the loop waited 2.2-3.0 s an epoch for the recorder thread (a shape it had not reached), and
# the other steps of the first 50 ran at the later rate; neither the collector (gc_freeze: no
# gain) nor CUDA's launch queues were the cause. ahead_padded replays the next longer recorded
# shape instead of waiting (graph summary: padded_up). The device-graph test of ahead_padded
# (without dropout, its values against the graphs recorded at each shape's first batch), a short
# warm-up, then multiples of 128 ahead_padded, the tutorial, ahead_padded again, ahead; ~9.5 min
# from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -s -p no:cacheprovider tests/test_recipe.py -k "ahead_padded" 2>&1 \
  | grep -E "^E|passed|failed|Error|largest relative gap" | head -40 | tee /tmp/bgout/pytest_cuda_padded.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_padded_b4 --append --jobs epoch_b4 --recipes"
AHEAD="pad_to_multiple_of=128,cuda_graphs_capture=ahead"
PADDED="pad_to_multiple_of=128,cuda_graphs_capture=ahead_padded"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 12
$E $B4 --variant "pad128_ahead_padded:$PADDED"
$E $B4 tutorial
$E $B4 --variant "pad128_ahead_padded:$PADDED"
$E $B4 --variant "pad128_ahead:$AHEAD"
