#!/usr/bin/env bash
# Issue 15: train.fuse_lora_add (scripts/lora_addmm.py: LoRA's product added to the 4-bit base's
# output by one addmm, instead of PEFT's clone, product, scaling and sum) on one H200. The CUDA
# tests first, a 12-step warm-up, then the 2048 x 4 blocks of the 7B config (every layer
# recomputed at 8 GiB: goal 4) without and with it, twice each, interleaved; then the batch-4
# epoch, config/batch4.yaml without and with it, twice each, against the tutorial's three times,
# interleaved (goal 2); last the block step's profile without and with it. ~19 min from the repo
# root in the background (bg.sh start ... 540, then waits of 560).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_lora_addmm.py tests/test_lora_dropout.py 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -20 | tee /tmp/bgout/pytest_cuda_lora_addmm.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
BL="--out /tmp/bgout/epochs_h200_fused_add --append --jobs block_2048x4 --recipes"
B4="--out /tmp/bgout/epochs_h200_fused_add --append --jobs epoch_b4 --recipes"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes --variant "batch4:@config/batch4.yaml" --steps 12
$E $BL pipeline
$E $BL --variant "blocks_fused:fuse_lora_add=true"
$E $BL pipeline
$E $BL --variant "blocks_fused:fuse_lora_add=true"
$E $B4 tutorial
$E $B4 --variant "batch4:@config/batch4.yaml"
$E $B4 --variant "batch4_fused:@config/batch4.yaml,fuse_lora_add=true"
$E $B4 tutorial
$E $B4 --variant "batch4_fused:@config/batch4.yaml,fuse_lora_add=true"
$E $B4 --variant "batch4:@config/batch4.yaml"
$E $B4 tutorial
python3 bench/profile_step.py --lengths /tmp/epochs/lengths_b4_order.json --block 2048 --batch 4 --steps 14 \
  --profile-from 6 --variants base fused --out /tmp/bgout/profile_step_h200_block_fused.json
