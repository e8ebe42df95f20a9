#!/usr/bin/env bash
# The trainer subclass moved out of scripts/recipe.py into scripts/sft_trainer.py: the tests that
# need a GPU (CUDA graphs recorded and replayed, recording ahead, the folded dropout and fused add
# in bf16) on one H200. ~4 min from the repo root (bg.sh start ... 300).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/bgout
timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_recipe.py \
  tests/test_graph_recorder.py tests/test_lora_dropout.py tests/test_lora_addmm.py 2>&1 \
  | grep -E "^E|passed|failed|Error|SKIP" | head -60 | tee /tmp/bgout/pytest_cuda_sft_trainer.txt
