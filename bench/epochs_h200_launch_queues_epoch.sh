#!/usr/bin/env bash
# Issue 15, one H200 (ran at commit 793278e: bench/results/epochs_h200_launch_queues_{b1,b4},
# profile_first_steps_h200). Its 4x did not apply: train.cuda_launch_queues set the variable after
# importing peft had started CUDA (the rows say so; since removed); epochs_h200_launch_queues_env.sh
# measured 4x from the process's start. The epochs behind train.cuda_launch_queues. bench/results/profile_recorder_queues_h200_* measured, in profiles of
# steps 5-9 of the batch-4 order, the loop's cudaGraphLaunch at 8 against 134 ms of host time with
# CUDA's launch queues 4x, no "Command Buffer Full" stall, and the recorder thread's recording of
# 4 x 896 in 0.57 against 1.19 s (the loop's own: ~0.5 s); the loop waited 0.0 against 0.45 s.
# In the epochs the loop waited 2.3-3.1 s for the thread in the first 50 steps
# (epochs_h200_ahead_warm, epochs_h200_recorder_split): if the thread now keeps up, the batch-4
# epoch recorded ahead drops from 42.4-44.9 s towards 40.5-42.3 s (steps 2-49 at the later steps'
# rate; 40.1 s at multiples of 64), where 3x of the tutorial's 116.8-121.2 s in those sittings is
# 38.9-40.4 s. The 7B config now sets 4x: `cuda_launch_queues=null` is the
# driver's default. The graph summary's launch_seconds_median (a replay's launch while the
# recorder runs, after the previous replay ended) says whether 4x is in force: ~0.008 s at
# 4 x 1,024 with it, ~0.13 s without (profile_recorder_queues_h200_*). Rows interleaved, after
# a 30-step warm-up; ~17 min from the repo root in the background (two waits).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_launch_queues_b4 --append --jobs epoch_b4 --recipes"
B1="--out /tmp/bgout/epochs_h200_launch_queues_b1 --append --jobs seed_epoch_b1 --recipes"
AHEAD="pad_to_multiple_of=128,cuda_graphs_capture=ahead"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $B4 tutorial
$E $B4 --variant "pad128_ahead_4x:$AHEAD"
$E $B4 --variant "pad128_ahead_default:$AHEAD,cuda_launch_queues=null"
$E $B4 --variant "pad64_ahead_4x:pad_to_multiple_of=64,cuda_graphs_capture=ahead"
$E $B4 tutorial
$E $B4 --variant "pad128_ahead_4x:$AHEAD"
$E $B1 --variant "pipeline_4x:cuda_launch_queues=4x"
$E $B1 --variant "pipeline_default:cuda_launch_queues=null"
# Then where the first two steps' 2.7 s go (the eager first step ~1.7 s, the loop's own first
# recording ~1 s; 0.6 s replayed): the profile of steps 0-4.
python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 8 --profile-from 0 \
  --variants pad128_ahead_log10 --out /tmp/bgout/profile_first_steps_h200.json
