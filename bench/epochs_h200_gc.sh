#!/usr/bin/env bash
# Issue 15, one H200 (run at commit 8a3b553: bench/results/epochs_h200_gc_{b4,b1}): why the recorder
# thread lags, and Python's garbage collector. The thread's background recordings took 0.66-1.89 s against the
# loop's own 0.48-0.74 s, and the loop waited 2.2-3.0 s for it in the first 50 steps; not for CUDA's
# launch queues (bench/results/epochs_h200_launch_queues_env_b4). In the profiles the thread's
# forward stood 66-317 ms at a time without a CUDA call while the loop waited on the card with the
# GIL released (trace_stalls_*), and a full collection of the ~580k objects alive when training
# starts took 0.29 s on a 2-core CPU, none with gc.freeze() (bench/results/gc_pauses_cpu.json). Each row now records every collection (python_gc: count and
# seconds per generation, and on which thread) and each capture's CPU time on its thread
# (cuda_graphs.captured_cpu_seconds: near its wall time the thread works slower, near the loop's
# own it waits). Rows: multiples of 128 recorded ahead with and without train.gc_freeze, twice each,
# recorded in the loop with it, the tutorial twice, interleaved, after the CUDA recorder tests and a
# 30-step warm-up; the seed's batch-1 epoch with and without; then the profile of steps 5-9 with
# Python stacks on every thread (what the thread's stretches without CUDA calls sat in:
# bench/trace_stalls.py). ~21 min from the repo root in the background (three waits).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "recording_ahead or recorder" 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -40 | tee /tmp/bgout/pytest_cuda_gc.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_gc_b4 --append --jobs epoch_b4 --recipes"
B1="--out /tmp/bgout/epochs_h200_gc_b1 --append --jobs seed_epoch_b1 --recipes"
AHEAD="pad_to_multiple_of=128,cuda_graphs_capture=ahead"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $B4 tutorial
$E $B4 --variant "pad128_ahead:$AHEAD"
$E $B4 --variant "pad128_ahead_gc_freeze:$AHEAD,gc_freeze=true"
$E $B4 --variant "pad128_gc_freeze:pad_to_multiple_of=128,gc_freeze=true"
$E $B4 tutorial
$E $B4 --variant "pad128_ahead_gc_freeze:$AHEAD,gc_freeze=true"
$E $B4 --variant "pad128_ahead:$AHEAD"
$E $B1 pipeline
$E $B1 --variant "pipeline_gc_freeze:gc_freeze=true"
python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 12 --profile-from 5 \
  --variants pad128_ahead_log10 --python-stacks --trace-dir /tmp/traces --out /tmp/bgout/profile_recorder_stacks_h200.json
python3 bench/trace_stalls.py /tmp/traces/trace_profile_recorder_stacks_h200_pad128_ahead_log10.json.gz \
  --out /tmp/bgout/trace_stalls_recorder_stacks_h200.json > /dev/null
