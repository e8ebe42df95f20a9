#!/usr/bin/env bash
# Issue 15, goal 3 again with the current code (the last unsloth sitting, epochs_h200_unsloth_same,
# ran at cefcc7b, before the fused LoRA add, the recorded steps' causal attention and the loop's
# recordings ahead): config/lean.yaml against unsloth 2026.10.9 on the 2048 x 4 blocks, three
# runs each interleaved (the last sitting had two, and its lean runs spread 11 %: the margin,
# 1.05x by the medians, was within it), and the batch-4 epoch once each; the 7B config's blocks
# twice between them (goal 4's row with the current code). unsloth's batch-1 epoch (~8 min a run)
# is left out: its margin was 3.95x. The lean rows run first while unsloth's layer is installed
# (bash bench/unsloth_install.sh, carrying .carry/unsloth from bench/unsloth_layer.sh, a second
# call); the unsloth rows wait for it. ~12 min from the repo root in the background (bg.sh start
# ... 540, then waits of 560).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_unsloth_current --append"
LEAN_BLOCKS="--jobs block_2048x4 --recipes --variant lean_yaml_5.75:@config/lean.yaml,memory_budget_gib=5.75"
$E $O $LEAN_BLOCKS
$E $O --jobs block_2048x4 --recipes pipeline
$E $O --jobs epoch_b4 --recipes --variant "lean_yaml:@config/lean.yaml"
for _ in $(seq 300); do [ -f /tmp/unsloth-site/unsloth/__init__.py ] && break; sleep 2; done
[ -f /tmp/unsloth-site/unsloth/__init__.py ] || { echo "unsloth's layer did not arrive in 600 s"; exit 1; }
$E $O --jobs block_2048x4 --recipes unsloth
$E $O $LEAN_BLOCKS
$E $O --jobs block_2048x4 --recipes pipeline
$E $O --jobs block_2048x4 --recipes unsloth
$E $O $LEAN_BLOCKS
$E $O --jobs block_2048x4 --recipes unsloth
$E $O --jobs epoch_b4 --recipes unsloth
