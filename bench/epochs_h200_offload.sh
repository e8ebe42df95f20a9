#!/usr/bin/env bash
# The third issue-15 run on one H200 (bench/results/epochs_h200_offload): the pipeline at
# unsloth's peak memory (goal 3) and the batch-4 epoch with cuda_graphs_max_tokens (goal 2),
# with unsloth and the tutorial in the same sitting for the ratios. ~17 min, run from the repo
# root in the background; each row is written as it ends. The rows come from
# python bench/epochs.py prepare --out .carry/epochs (on a CPU); the unsloth rows wait for its
# layer (bash .carry/unsloth/install.sh, a second call while the pipeline's rows run).
# As run: `bash THIS` (first sitting), then `bash THIS graphs` (second sitting, after the
# copies were made recordable; its rows in bench/results/epochs_h200_offload_graphs).
#
# The memory rows ("lean"): the inputs of checkpointed layers in host memory
# (train.offload_checkpoints) and the base double-quantised as unsloth loads it (its rows:
# NF4 with double quantisation), under a memory_budget_gib equal to unsloth's measured peak
# in bench/results/epochs_h200 (5.754 GiB on 2048 x 4 blocks, 4.841 GiB for the batch-4 epoch).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --out /tmp/bgout/epochs_h200_offload --repeats-block 1"
LEAN="offload_checkpoints=true,double_quant=true"
# The CUDA cases: the offloaded inputs' device bytes freed, recorded copies; the folded dropout's.
python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_lora_dropout.py 2>&1 | tail -25 \
  | tee /tmp/bgout/pytest_offload_cuda.txt
if [ "${1:-first}" = graphs ]; then
  # Second sitting: the offloaded copies recorded by cuda_graphs (checkpointed batches were eager
  # in the first), at unsloth's peaks: 4.841 GiB (batch-4 epoch) and 4.200 GiB (batch-1 epoch).
  O="--out /tmp/bgout/epochs_h200_offload_graphs"
  $E $O --jobs epoch_b4 --recipes --variant "lean_4.84:$LEAN,memory_budget_gib=4.84"
  $E $O --jobs seed_epoch_b1 --recipes --variant "lean_4.2:$LEAN,memory_budget_gib=4.2" --append
  for _ in $(seq 300); do [ -f /tmp/unsloth-site/unsloth/__init__.py ] && break; sleep 2; done
  $E $O --jobs epoch_b4 --recipes unsloth --append
  exit
fi
$E --jobs block_2048x4 --recipes pipeline --variant "lean_5.75:$LEAN,memory_budget_gib=5.75"
$E --jobs epoch_b4 --recipes --variant "lean_4.84:$LEAN,memory_budget_gib=4.84" --append
$E --jobs epoch_b4 --recipes pipeline --append
$E --jobs epoch_b4 --recipes tutorial --append
$E --jobs block_2048x4 --recipes tutorial --append
for _ in $(seq 300); do [ -f /tmp/unsloth-site/unsloth/__init__.py ] && break; sleep 2; done
$E --jobs block_2048x4 --recipes unsloth --append
$E --jobs epoch_b4 --recipes unsloth --append
