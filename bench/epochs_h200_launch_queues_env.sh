#!/usr/bin/env bash
# Issue 15, one H200 (ran at commit f18ab1f: bench/results/epochs_h200_launch_queues_env_b4,
# cuda_start_probe_h200.txt; 4x no faster). The launch queues 4x in force in the epoch. The sitting before
# (bench/epochs_h200_launch_queues_epoch.sh) set train.cuda_launch_queues: 4x, which its rows
# recorded as "child processes only: CUDA had started here": importing peft (bitsandbytes) starts CUDA,
# before the train stage sets the variable, so its 4x rows ran with the driver's default
# queues. Here the variable is in each row's environment when its process starts (an upper-case
# variant key), interleaved with the default and the tutorial, after a 30-step warm-up; first, which
# import starts CUDA. ~9 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 - > /tmp/bgout/cuda_start_probe.txt 2>&1 <<'PY'
import sys

import torch

sys.path.insert(0, "scripts")
for name in ("transformers", "peft", "bitsandbytes", "recipe", "train"):
    __import__(name)
    print(f"after import {name}: torch.cuda.is_initialized() = {torch.cuda.is_initialized()}")
PY
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_launch_queues_env_b4 --append --jobs epoch_b4 --recipes"
AHEAD="pad_to_multiple_of=128,cuda_graphs_capture=ahead"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $B4 tutorial
$E $B4 --variant "pad128_ahead_4x_env:$AHEAD,CUDA_SCALE_LAUNCH_QUEUES=4x"
$E $B4 --variant "pad128_ahead_default:$AHEAD,cuda_launch_queues=null"
$E $B4 --variant "pad128_ahead_4x_env:$AHEAD,CUDA_SCALE_LAUNCH_QUEUES=4x"
