#!/usr/bin/env bash
# The tests that need a GPU, on one H200, after the memory model's revision 4 (the recorded and
# offloaded runs' budgets now count cuBLAS's workspaces per capture mode; the fused LM head's tile):
# CUDA graphs recorded and replayed, recording ahead, the recipe, the folded dropout and fused add
# in bf16, the NF4 Triton kernel, the offloaded checkpoints and layers. ~5 min from the repo root
# in the background (.carry/bench/bg.sh start ... 520).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/bgout
timeout 500 python3 -m pytest -q -p no:cacheprovider -rfEs --durations=10 \
  tests/test_cuda_graphs.py tests/test_recipe.py tests/test_graph_recorder.py tests/test_lora_dropout.py \
  tests/test_lora_addmm.py tests/test_nf4_dequantize.py tests/test_offload.py tests/test_layer_offload.py 2>&1 \
  | grep -E "^E |^(FAILED|ERROR|SKIPPED)|passed|failed|^[0-9.]+s (call|setup)" | head -120 \
  | tee /tmp/bgout/pytest_cuda_revision4.txt
