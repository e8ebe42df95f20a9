#!/usr/bin/env bash
# The switches CPU-tested since the last GPU test sitting (train.cuda_graphs_pad_up's stand-in
# replays, recipe.skip_final_checkpoint) and the tests of the CUDA graphs, the recorder and the
# recipe on one H200, with jsonschema carried this time (the config check's tests failed on
# its absence in bench/results/pytest_cuda_sft_trainer.txt). ~4 min from the repo root.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/bgout
timeout 400 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_graph_recorder.py tests/test_cuda_graphs.py \
  tests/test_recipe.py 2>&1 | grep -E "^E|^FAILED|^ERROR|passed|failed|Error|SKIP" | head -80 \
  | tee /tmp/bgout/pytest_cuda_pad_up.txt
