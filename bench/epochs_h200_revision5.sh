#!/usr/bin/env bash
# Issue 15, goal 5: revision 5 of the memory model (the offloading forward's embedding output, top
# MLP input and offloaded layers' small saved tensors; no LoRA gradients in an eager forward without
# graphs) and the folded lora_A casting its own weight (autocast's cache kept each lora_A's bf16
# copy through the forward: 32 MiB at the 7B shape, bench/results/memory_h200_steps). On one H200:
# the GPU tests of the folded dropout and the offloaded layers; the batch-4 epoch with its batches
# over 4 x 640 eager beside recorded ones (8.089 GiB at an 8 GiB budget under revision 4), and as
# shipped (config/batch4.yaml). ~6 min from the repository root in the background (.carry/bench/bg.sh).
NAME=${1:-epochs_h200_revision5}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
timeout 300 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_lora_dropout.py tests/test_layer_offload.py 2>&1 \
  | grep -E "^E |^(FAILED|ERROR|SKIPPED)|passed|failed" | head -60 | tee /tmp/bgout/pytest_cuda_revision5.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1 --out /tmp/bgout/$NAME --append --jobs epoch_b4"
$E --recipes --variant "eager_over_640:@config/batch4.yaml,cuda_graphs_max_tokens=2560"
$E --recipes --variant "batch4:@config/batch4.yaml"
