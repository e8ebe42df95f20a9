#!/usr/bin/env bash
# Issue 15: where a background recording's time goes. In bench/results/epochs_h200_ahead_warm the
# recorder thread's recordings took 0.73-1.88 s each beside the loop's replays against 0.58-0.97 s
# for the loop's own (its wait for the GPU included), and the loop waited 2.4-3.1 s for them in the
# first 50 steps of a batch-4 epoch. The graph summary now splits each recording into
# torch.cuda.graph's entry (its wait for the GPU, cache flush, capture start), the captured forward
# and backward, and the instantiation; the profile of steps 5-9 beside the thread (the one prepared
# in the last sitting failed on its own device sync while the thread captured: fixed).
# After a 30-step warm-up; ~7 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 14 --profile-from 5 \
  --variants pad128_ahead_log10 --trace-dir /tmp/traces --out /tmp/bgout/profile_recorder_event_h200_2.json
tar -C /tmp -czf /tmp/bgout/traces_recorder_event_h200_2.tgz traces
$E --out /tmp/bgout/epochs_h200_recorder_split_b4 --append --jobs epoch_b4 --recipes \
  --variant "pad128_ahead:pad_to_multiple_of=128,cuda_graphs_capture=ahead"
B1="--out /tmp/bgout/epochs_h200_recorder_split_b1 --append --jobs seed_epoch_b1 --recipes"
$E $B1 --variant "ahead:cuda_graphs_capture=ahead"
$E $B1 pipeline
