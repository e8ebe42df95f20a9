#!/usr/bin/env bash
# Issue 15, sixth run on one H200 (bench/results/epochs_h200_allocator): what the job holds on the
# card (peak reserved), not only what its tensors use (peak allocated). unsloth sets expandable
# segments on import; the pipeline now does too (train.expandable_segments). Rows, in order of
# what they answer: the lean batch-4 epoch with and without expandable segments (the setting's
# effect, same sitting); the lean batch-1 epoch, and again with 8 MiB cuBLAS workspaces instead
# of 32 (is the 0.062 GiB a recording adds the capture stream's workspaces?); unsloth's two
# epochs; the shipped 8 GiB batch-4 epoch after the recording fix, and the tutorial's (goal 2).
# As run, its rows up to unsloth's batch-4 epoch completed: the card was handed back between two
# calls during unsloth's batch-1 epoch (bench/epochs_h200_allocator_b4.sh followed on a fresh one).
# ~22 min from the repo root in the background; the unsloth rows wait for their layer
# (bash .carry/unsloth/install.sh, a second call). Rows: python bench/epochs.py prepare --out .carry/epochs.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_allocator --append"
LEAN="offload_checkpoints=true,double_quant=true"
$E $O --jobs epoch_b4 --recipes --variant "lean_4.84:$LEAN,memory_budget_gib=4.84" \
  --variant "lean_4.84_torch_default:$LEAN,memory_budget_gib=4.84,expandable_segments=false"
$E $O --jobs seed_epoch_b1 --recipes --variant "lean_4.2:$LEAN,memory_budget_gib=4.2" \
  --variant "lean_4.2_workspace_8mib:$LEAN,memory_budget_gib=4.2,CUBLAS_WORKSPACE_CONFIG=:4096:2:16:8"
for _ in $(seq 300); do [ -f /tmp/unsloth-site/unsloth/__init__.py ] && break; sleep 2; done
$E $O --jobs epoch_b4 --recipes unsloth
$E $O --jobs seed_epoch_b1 --recipes unsloth
$E $O --jobs epoch_b4 --recipes pipeline tutorial
