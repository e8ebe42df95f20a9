#!/usr/bin/env bash
# Issue 15: where a batch-4 step of the shipped 7B recipe (config/llama2-7b.yaml, 8 GiB budget)
# spends its time, host and card, at three block lengths: 4 x 256 (recorded, no recomputation),
# 4 x 1024 (eager above cuda_graphs_max_tokens, and recorded), 2048 x 4 (eager, every layer
# checkpointed: goal 4). Each variant profiles steps 6-10 and writes its timeline.
# From the repo root with .carry/bench and .carry/gpu carried: ~7 min.
set -u
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/bgout /tmp/traces
P="python3 bench/profile_step.py --batch 4 --steps 14 --profile-from 6 --trace-dir /tmp/traces"
$P --block 256 --variants base eager --out /tmp/bgout/profile_step_h200_b4_256.json
$P --block 1024 --variants base graphs_all --out /tmp/bgout/profile_step_h200_b4_1024.json
$P --block 2048 --variants base --out /tmp/bgout/profile_step_h200_b4_2048.json
tar -C /tmp -cf /tmp/bgout/traces_h200_b4.tar traces
