#!/usr/bin/env bash
# The second issue-15 run on one H200 (bench/results/epochs_h200_folded): folded LoRA dropout
# (train.recompute_lora_dropout) and CUDA graphs over checkpointed layers, ~22 min, run from the
# repo root in the background; each row is written as it ends. The rows come from:
# python bench/epochs.py prepare --out .carry/epochs (on a CPU).
# As run: the rows up to the pipeline's batch-1 epoch, then (after the fix of the recording of
# checkpointed layers: the recomputation ran another attention kernel) `bash THIS rest`.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --out /tmp/bgout/epochs_h200_folded --repeats-block 1"
if [ "${1:-all}" = all ]; then
  # The folded dropout's CUDA cases: the stock numbers bit for bit in bf16, the saved bytes counted.
  python3 -m pytest -q -p no:cacheprovider tests/test_lora_dropout.py 2>&1 | tail -25 | tee /tmp/bgout/pytest_lora_dropout_cuda.txt
  # The loss yardstick (50 steps): the shipped recipe (folded, graphs) and graphs with PEFT's
  # dropout (the last run's recipe).
  $E --jobs seed_epoch_b1 --recipes reference --variant graphs_folded_50_steps:cuda_graphs=true \
    --variant graphs_unfolded_50_steps:cuda_graphs=true,recompute_lora_dropout=false --steps 50
fi
$E --jobs seed_epoch_b1 --recipes pipeline --append  # (again: the first lease ended before it came back)
# Graphs over every layer checkpointed (the recording holds the recomputation), 50 steps.
$E --jobs seed_epoch_b1 --variant graphs_checkpointed_50_steps:cuda_graphs=true,gradient_checkpointing=true,checkpoint_every=1 \
  --recipes --steps 50 --append
$E --jobs epoch_b4 --recipes pipeline --append
$E --jobs seed_epoch_b1 --recipes tutorial --append
$E --jobs epoch_b4 --recipes tutorial --append
$E --jobs block_2048x4 --recipes pipeline --append
$E --jobs block_2048x4 --recipes tutorial --append
