#!/usr/bin/env bash
# Issue 15: the recorder thread's captures beside the loop's replays, with CUDA's launch queues 4x.
# bench/results/profile_recorder_event_h200_2 found the loop's host blocked in CUDA calls while the
# GPU ran a 4 x 1024 replay: cudaGraphLaunch 131-140 ms a step ("Command Buffer Full", 500 ms over
# 4 steps), then the next launches (the gradient buffers' zeroing, 151 ms; the loss's copy, 179 ms),
# each holding the GIL, while the thread's capture could not run Python (its forward stalled ~470 of
# ~770 ms). CUDA_SCALE_LAUNCH_QUEUES=4x (read at CUDA's start) makes the launch queues 4x larger
# (llama.cpp sets it for the same stalls, ggml-org/llama.cpp#19042). The same profile without and
# with it (the first cold, which warms the kernel caches), then a batch-4 epoch recorded ahead with it.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
P="python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 14 --profile-from 5"
$P --variants pad128_ahead_log10 --out /tmp/bgout/profile_recorder_queues_h200_default.json
CUDA_SCALE_LAUNCH_QUEUES=4x $P --variants pad128_ahead_log10 --trace-dir /tmp/traces \
  --out /tmp/bgout/profile_recorder_queues_h200_4x.json
tar -C /tmp -czf /tmp/bgout/traces_recorder_queues_h200_4x.tgz traces
python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1 --out /tmp/bgout/epochs_h200_launch_queues \
  --append --jobs epoch_b4 --recipes \
  --variant "pad128_ahead_q4x:pad_to_multiple_of=128,cuda_graphs_capture=ahead,CUDA_SCALE_LAUNCH_QUEUES=4x"
