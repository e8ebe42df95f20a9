#!/usr/bin/env bash
# Issue 15, fifth run on one H200 (bench/results/epochs_h200_unsloth_peak): the lean pipeline
# at unsloth's peak memory after the fix bench/peaks_h200.sh found (a recording kept the
# autograd graph behind its loss, and with it the embedding output and its gradient, per
# recorded shape), with unsloth's batch-4 epoch in the same sitting. ~12 min from the repo
# root in the background; the unsloth row waits for its layer (bash .carry/unsloth/install.sh,
# a second call). The rows come from python bench/epochs.py prepare --out .carry/epochs.
# Lean: checkpointed layers' inputs in host memory, the base double-quantised as unsloth loads
# it, memory_budget_gib = unsloth's measured peak (4.841 GiB batch 4, 4.200 GiB batch 1).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_offload.py -k "recorded or device_bytes" 2>&1 | tail -5 \
  | tee /tmp/bgout/pytest_offload_cuda.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_unsloth_peak"
LEAN="offload_checkpoints=true,double_quant=true"
$E $O --jobs epoch_b4 --recipes --variant "lean_4.84:$LEAN,memory_budget_gib=4.84"
$E $O --jobs seed_epoch_b1 --recipes --variant "lean_4.2:$LEAN,memory_budget_gib=4.2" --append
for _ in $(seq 300); do [ -f /tmp/unsloth-site/unsloth/__init__.py ] && break; sleep 2; done
$E $O --jobs epoch_b4 --recipes unsloth --append
# What is alive at the batch-1 lean peak (the first 100 steps, allocator history).
$E --out /tmp/bgout/graph_memory_h200_b1 --memory-history --steps 100 --jobs seed_epoch_b1 --recipes \
  --variant "lean_4.2:$LEAN,memory_budget_gib=4.2"
$E $O --jobs seed_epoch_b1 --recipes unsloth --append
