#!/usr/bin/env bash
# Issue 15, goal 3 in one sitting on one H200 (ran at cefcc7b: bench/results/epochs_h200_unsloth_same;
# this is the sitting's record): config/lean.yaml against
# unsloth 2026.10.9 on the 2048 x 4 blocks (lean at unsloth's block peak, 5.75 GiB, the blocks
# eager as lean.yaml leaves them: 11,647 tok/s at 5.29 / 5.77 GiB in epochs_h200_lean_blocks_2,
# against unsloth's 11,215-11,457 at 5.75 / 6.14 in three earlier sittings), the batch-4 epoch
# (lean at 4.84 GiB) and the tutorial's batch-1 epoch (lean at 4.2 GiB), rows interleaved, the
# blocks twice each. The lean rows run first while unsloth's layer is installed
# (bash bench/unsloth_install.sh, carrying .carry/unsloth from bench/unsloth_layer.sh, a second
# call); the unsloth rows wait for it. ~20 min from the repo root in the background (bg.sh start
# ... 540, then waits of 560); the batch-1 pair last (unsloth's epoch ~6.5 min).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_unsloth_same --append"
BLOCKS="--jobs block_2048x4 --recipes --variant lean_yaml_5.75:@config/lean.yaml,memory_budget_gib=5.75"
$E $O $BLOCKS
$E $O --jobs epoch_b4 --recipes --variant "lean_yaml:@config/lean.yaml"
for _ in $(seq 300); do [ -f /tmp/unsloth-site/unsloth/__init__.py ] && break; sleep 2; done
[ -f /tmp/unsloth-site/unsloth/__init__.py ] || { echo "unsloth's layer did not arrive in 600 s"; exit 1; }
$E $O --jobs block_2048x4 --recipes unsloth
$E $O $BLOCKS
$E $O --jobs block_2048x4 --recipes unsloth
$E $O --jobs epoch_b4 --recipes unsloth
$E $O --jobs seed_epoch_b1 --recipes --variant "lean_yaml_4.2:@config/lean.yaml,memory_budget_gib=4.2"
$E $O --jobs seed_epoch_b1 --recipes unsloth
