#!/usr/bin/env bash
# Issue 15, ninth run on one H200 (bench/results/epochs_h200_nosync): the batch-4 profile
# (bench/profile_h200_batch4.sh) found the GPU idle between recorded steps while the host waited
# on device syncs: bitsandbytes' optimizer after every parameter, the Trainer's NaN filter and
# token count, the right-padding check, the step timer, a log line every step. The 7B config now
# trains with torch's fused AdamW and logs every 10th step; the trainer reads the batch's facts
# on the host and times steps with CUDA events. Rows: the shipped batch-4 epoch; the same with
# bitsandbytes' paged AdamW (the optimizer's share, and its loss curve against the fused one's);
# padded to multiples of 128 (8 recorded shapes, not 16); the tutorial's batch-4 epoch (goal 2);
# the 2048 x 4 blocks eager and recorded (goal 4). The CUDA tests first (the no-sync test among
# them). ~10 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py tests/test_lora_dropout.py \
  -k "never_wait or dropout or causal_flag" 2>&1 | tail -15 | tee /tmp/bgout/pytest_cuda_nosync.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_nosync --append"
$E $O --jobs epoch_b4 --recipes pipeline
$E $O --jobs epoch_b4 --recipes --variant "paged_adamw:optimizer=paged_adamw_32bit"
$E $O --jobs epoch_b4 --recipes --variant "pad128:pad_to_multiple_of=128"
$E $O --jobs epoch_b4 --recipes tutorial
$E $O --jobs block_2048x4 --recipes pipeline --variant "all_recorded:cuda_graphs_max_tokens=null"
