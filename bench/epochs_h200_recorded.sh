#!/usr/bin/env bash
# Issue 15, seventh run on one H200 (bench/results/epochs_h200_recorded): after the two fixes the
# batch-4 profile found (bench/profile_h200_batch4.sh): recorded steps attend by SDPA's causal
# flag (flash) instead of a mask tensor (memory-efficient kernel), and the folded dropout packs
# and unpacks its masks with one multiply or lookup per byte. Rows, in order of what they answer:
# the shipped 8 GiB batch-4 epoch, with batches over 3,584 tokens eager and with every batch
# recorded, and the tutorial's (goal 2); the 2048 x 4 blocks eager and recorded (goal 4);
# config/lean.yaml's whole batch-4 epoch through its config keys, unsloth's batch-4 epoch and
# blocks, the lean blocks (goal 3). CUDA tests first. ~16 min from the repo root in the
# background; the unsloth rows wait for their layer (bash .carry/unsloth/install.sh, a second call).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_lora_dropout.py tests/test_recipe.py -k "dropout or causal_flag" \
  2>&1 | tail -3 | tee /tmp/bgout/pytest_cuda_recorded.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_recorded --append"
ALL="cuda_graphs_max_tokens=null"
LEAN="offload_checkpoints=true,double_quant=true,memory_budget_gib=4.84,$ALL,expandable_segments=true"
LEAN="$LEAN,cublas_workspace_config=:4096:2:16:8"
$E $O --jobs epoch_b4 --recipes pipeline --variant "all_recorded:$ALL"
$E $O --jobs epoch_b4 --recipes tutorial
$E $O --jobs block_2048x4 --recipes pipeline --variant "all_recorded:$ALL"
$E $O --jobs epoch_b4 --recipes --variant "lean_yaml:$LEAN"
for _ in $(seq 300); do [ -f /tmp/unsloth-site/unsloth/__init__.py ] && break; sleep 2; done
$E $O --jobs epoch_b4 block_2048x4 --recipes unsloth
$E $O --jobs block_2048x4 --recipes --variant "lean_yaml_5.75:${LEAN/4.84/5.75}"
