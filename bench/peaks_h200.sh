#!/usr/bin/env bash
# Issue 15, fourth run on one H200: where the recorded (CUDA-graph) step's memory goes and
# where the 2048 x 4 step's time goes. ~6 min from the repo root, in the background; the rows
# come from python bench/epochs.py prepare --out .carry/epochs (on a CPU).
#  1. The CUDA test cases of the offload and the folded dropout (the last review's changes).
#  2. The batch-4 epoch's first 6 steps (the 4 x 1024 batches: the first eager, the second
#     recorded, then replayed) in the lean setting at unsloth's peak (4.84 GiB), recorded and
#     eager, with the allocator's history: what is alive at each run's peak, by allocation site
#     (bench/memory_peak.py) -> graph_memory_h200.{json,md}.
#     Both ran eagerly (4 x 1024 tokens is over cuda_graphs_max_tokens): hence a second call,
#     `bash THIS recorded`: the first 80 steps of the lean batch-4 epoch, recorded, with the
#     history and the peak after every step -> graph_memory_h200_recorded.{json,md}.
#  3. A profile of the pipeline's 2048 x 4 step (every layer checkpointed at the 8 GiB budget,
#     eager): device time by kernel family against the wall -> profile_step_h200_block.json.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
LEAN="offload_checkpoints=true,double_quant=true,memory_budget_gib=4.84"
if [ "${1:-first}" = recorded ]; then
  python3 bench/epochs.py run --rows-dir /tmp/epochs --out /tmp/bgout/graph_memory_h200_recorded --repeats-block 1 \
    --memory-history --steps 80 --jobs epoch_b4 --recipes --variant "lean_graphs:$LEAN"
  exit
fi
python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_lora_dropout.py 2>&1 | tail -25 \
  | tee /tmp/bgout/pytest_offload_cuda.txt
python3 bench/epochs.py run --rows-dir /tmp/epochs --out /tmp/bgout/graph_memory_h200 --repeats-block 1 \
  --memory-history --steps 6 --jobs epoch_b4 --recipes \
  --variant "lean_graphs:$LEAN" --variant "lean_eager:$LEAN,cuda_graphs=false"
python3 bench/profile_step.py --block 2048 --batch 4 --steps 14 --profile-from 6 --variants base \
  --out /tmp/bgout/profile_step_h200_block.json
