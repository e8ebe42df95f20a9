#!/usr/bin/env bash
# The code as it is (revision 5 of the memory model, the folded lora_A's own cast) end to end on one
# H200: the whole DAG with the 7B recipe (bench/dag_h200.sh, its results into /tmp/bgout), then the
# tests that need a GPU (the list of bench/pytest_h200_revision4.sh) in the repository root.
# ~8 min from the repository root in the background (.carry/bench/bg.sh start ... 560), after the
# carried wheels, the model's three parts and the data went to /tmp/site and /tmp/dagparts.
bash bench/dag_h200.sh
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout 300 python3 -m pytest -q -p no:cacheprovider -rfEs --durations=10 \
  tests/test_cuda_graphs.py tests/test_recipe.py tests/test_graph_recorder.py tests/test_lora_dropout.py \
  tests/test_lora_addmm.py tests/test_nf4_dequantize.py tests/test_offload.py tests/test_layer_offload.py 2>&1 \
  | grep -E "^E |^(FAILED|ERROR|SKIPPED)|passed|failed|^[0-9.]+s (call|setup)" | head -120 \
  | tee /tmp/bgout/pytest_cuda_revision5_all.txt
