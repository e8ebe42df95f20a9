#!/usr/bin/env bash
# Issue 15, ninth run continued (bench/results/epochs_h200_nosync), right after
# bench/epochs_h200_nosync.sh on the same card: the no-sync test with its step count fixed, then
# batch-4 epochs padded to multiples of 256, multiples of 128 with paged AdamW, and the 7B config
# again (the first row of the sitting had compiled the Triton kernels). ~5 min in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k never_wait 2>&1 | grep -E "^E|passed|failed" | head -20 | tee /tmp/bgout/pytest_cuda_nosync2.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_nosync --append"
$E $O --jobs epoch_b4 --recipes --variant "pad256:pad_to_multiple_of=256"
$E $O --jobs epoch_b4 --recipes --variant "pad128_paged_adamw:pad_to_multiple_of=128,optimizer=paged_adamw_32bit"
$E $O --jobs epoch_b4 --recipes pipeline
