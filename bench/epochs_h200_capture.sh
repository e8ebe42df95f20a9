#!/usr/bin/env bash
# Issue 15, on one H200: is the host ahead of the card when a new batch shape records, and does
# a recording hide behind the steps queued before it? A batch-4 epoch at multiples of 128 spends
# ~6 s in 8 recordings with the card idle (bench/results/epochs_h200_flash). Rows: a 30-step
# warm-up, then epochs at multiples of 128 with torch.cuda.graph's wait timed (drain_seconds),
# with train.cuda_graphs_capture: queued (gpu_busy_while_queued: the card still ran earlier steps
# when each capture began and ended), the same with flash attention in the recordings (no cuDNN
# plan to build per shape), the tutorial's; then steps 6-9 of the epoch's order profiled with a
# log line every 10th step (the recording at step 9, 4 x 896, on the timeline). CUDA tests first.
# ~9 min from the repo root in the background (the profile's row lengths: bench/h200_workdir.sh).
# As run (commit 8e97f94); train.cuda_graphs_capture: queued is gone since (its rows no longer
# run), and the profile's pad128_queued_log10 is pad128_ahead_log10.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "queued_capture or never_wait or attention_kernel" 2>&1 \
  | grep -E "^E|passed|failed" | head -20 | tee /tmp/bgout/pytest_cuda_capture.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_capture --append"
$E --out /tmp/bgout/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $O --jobs epoch_b4 --recipes --variant "pad128:pad_to_multiple_of=128"
$E $O --jobs epoch_b4 --recipes --variant "pad128_queued:pad_to_multiple_of=128,cuda_graphs_capture=queued"
$E $O --jobs epoch_b4 --recipes --variant \
  "pad128_queued_flash:pad_to_multiple_of=128,cuda_graphs_capture=queued,cuda_graphs_attention=flash"
$E $O --jobs epoch_b4 --recipes tutorial
python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 14 --profile-from 5 \
  --variants pad128_ahead_log10 --trace-dir /tmp/traces --out /tmp/bgout/profile_capture_h200.json
tar -C /tmp -czf /tmp/bgout/traces_capture_h200.tgz traces
