#!/usr/bin/env bash
# The recipe's, the CUDA graphs' and the recorder's tests on one H200 after cuda_graphs_pad_up's
# removal, with jsonschema carried (the config check's tests failed on its absence in
# bench/results/pytest_cuda_sft_trainer.txt); among them, on the card and with Liger's kernels,
# that a checkpointed layer's recomputation skips down_proj. ~3 min from the repo root.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/bgout
timeout 400 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_recipe.py tests/test_cuda_graphs.py \
  tests/test_graph_recorder.py 2>&1 | grep -E "^E |^FAILED|^ERROR|^SKIPPED|passed|failed" | head -80 \
  | tee /tmp/bgout/pytest_cuda_recompute.txt
