#!/usr/bin/env bash
# Issue 15, sixth run, second part (bench/results/epochs_h200_allocator_b4_100steps), as run on a
# fresh H200 after bench/epochs_h200_allocator.sh's card was handed back: the first 100 steps of
# the lean batch-4 epoch, with batches over 3,584 tokens eager and with every batch recorded (one
# memory pool: the eager batches of the first part held 1.2 GiB more than they allocated). ~3 min
# from the repo root, .carry/bench and .carry/epochs carried (no checkout copy, no unsloth layer).
PYTHONPATH=/tmp/site python3 .carry/bench/resolve.py /tmp/site .carry/bench > /tmp/resolve.log 2>&1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
L="offload_checkpoints=true,double_quant=true,memory_budget_gib=4.84,CUBLAS_WORKSPACE_CONFIG=:4096:2:16:8"
python3 bench/epochs.py run --rows-dir .carry/epochs --repeats-block 1 --steps 100 --jobs epoch_b4 --recipes \
  --variant "lean_4.84_workspace_8mib:$L" --variant "lean_4.84_workspace_8mib_all_recorded:$L,cuda_graphs_max_tokens=null" \
  --out "$OUT/epochs_h200_allocator_b4_100steps"
