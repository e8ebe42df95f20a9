#!/usr/bin/env bash
# Issue 15, goal 5: what the memory model misses at a small model. The whole DAG on one H200 with the
# 7B configs' recipe over SmolLM2-135M at a 1 GiB budget (bench/dag_h200.sh) peaked at 1.35 and
# 1.34 GiB where the plan expected 0.99 and 1.00: +0.40 GiB in both arms, where the 7B config's
# recorded batch-4 steps sit within their 1.05 graph headroom. With torch's allocation history, what
# is alive at the peak: SmolLM2's shape (random weights) at batch 4 and batch 1, then the 7B config's
# batch 4, 12 steps each (group_by_length's longest batches first), then SmolLM2's whole batch-4 epoch.
# ~6 min from the repository root in the background (.carry/bench/bg.sh).
NAME=${1:-memory_h200_head}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
SMOL="--shape smollm2 --out /tmp/bgout/${NAME}_smollm2 --append"
$E $SMOL --jobs epoch_b4 --recipes --variant "smollm2_b4:@config/batch4.yaml,memory_budget_gib=1" --steps 12 --memory-history
$E $SMOL --jobs seed_epoch_b1 --recipes --variant "smollm2_b1:memory_budget_gib=0.5" --steps 12 --memory-history
$E --out /tmp/bgout/${NAME}_7b --jobs epoch_b4 --recipes --variant "batch4:@config/batch4.yaml" --steps 12 --memory-history
$E $SMOL --jobs epoch_b4 --recipes --variant "smollm2_b4:@config/batch4.yaml,memory_budget_gib=1"
