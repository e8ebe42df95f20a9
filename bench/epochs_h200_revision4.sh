#!/usr/bin/env bash
# Issue 15, goals 2 and 5: revision 4 of the memory model on one H200. It counts TRL's fused LM
# head's logits tile and cuBLAS's workspaces (bench/results/memory_h200_head), and the recorded
# steps' headroom falls to 1.02 (config/batch4.yaml, config/llama2-7b.yaml). Each plan's peak against
# its budget: SmolLM2-135M's shape at 1 GiB (batch 4) and 0.5 GiB (batch 1), the 7B config's
# batch-1 epoch at 8 GiB; then the batch-4 epoch against the tutorial's, config/batch4.yaml twice
# around it after a 12-step warm-up (Triton's disk cache). ~11 min from the repository root in the
# background over two calls (.carry/bench/bg.sh).
NAME=${1:-epochs_h200_revision4}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
SMOL="--shape smollm2 --out /tmp/bgout/${NAME}_smollm2 --append --recipes"
$E $SMOL --jobs epoch_b4 --variant "smollm2_b4:@config/batch4.yaml,memory_budget_gib=1"
$E $SMOL --jobs seed_epoch_b1 --variant "smollm2_b1:memory_budget_gib=0.5"
B4="--out /tmp/bgout/$NAME --append --jobs epoch_b4 --recipes"
$E --out /tmp/bgout/$NAME --append --jobs seed_epoch_b1 --recipes pipeline
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes --variant "batch4:@config/batch4.yaml" --steps 12
$E $B4 --variant "batch4:@config/batch4.yaml"
$E $B4 tutorial
$E $B4 --variant "batch4:@config/batch4.yaml"
