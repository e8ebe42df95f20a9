#!/usr/bin/env bash
# Issue 15, prepared for the next sitting on one H200 (not yet run): why the recorder thread lags.
# Its background recordings took 0.66-1.89 s against the loop's own 0.48-0.74 s, and the loop
# waited 2.2-3.0 s for it in the first 50 steps; not for CUDA's launch queues (4x changed nothing,
# bench/results/epochs_h200_launch_queues_env_b4). The graph summary now gives each capture's CPU
# time on its own thread (captured_cpu_seconds) beside its wall time (captured_seconds): near the
# wall time, the thread works slower beside the replays (caches, the autograd thread's share);
# near the loop's own, it waits (the GIL, autograd's device thread). The CUDA recorder tests first
# (they check the new field), then after a 30-step warm-up the tutorial and multiples of 128
# recorded ahead twice and in the loop once, interleaved. ~10 min from the repo root in the
# background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "recording_ahead or recorder" 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -40 | tee /tmp/bgout/pytest_cuda_recorder_cpu.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_recorder_cpu_b4 --append --jobs epoch_b4 --recipes"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $B4 tutorial
$E $B4 --variant "pad128_ahead:pad_to_multiple_of=128,cuda_graphs_capture=ahead"
$E $B4 --variant "pad128:pad_to_multiple_of=128"
$E $B4 --variant "pad128_ahead:pad_to_multiple_of=128,cuda_graphs_capture=ahead"
