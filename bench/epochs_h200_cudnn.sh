#!/usr/bin/env bash
# Issue 15, eighth run on one H200 (bench/results/epochs_h200_cudnn): bench/epochs_h200_recorded.sh
# found the recorded steps still on PyTorch's memory-efficient attention with the causal flag
# (the recorded 2048 x 4 step 0.88 s against 0.67 s eager). First which SDPA kernels run eager and
# inside a recording, and how fast (bench/attention_check.py); then, with cuDNN's attention first
# in the recordings' list, the 2048 x 4 blocks and the batch-4 epoch with every batch recorded, and
# the tutorial's batch-4 epoch in the same sitting. ~6 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 bench/attention_check.py --out /tmp/bgout/attention_check_h200.json
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_cudnn --append"
ALL="cuda_graphs_max_tokens=null"
$E $O --jobs block_2048x4 --recipes --variant "all_recorded:$ALL"
$E $O --jobs epoch_b4 --recipes --variant "all_recorded:$ALL"
$E $O --jobs epoch_b4 --recipes tutorial
