#!/usr/bin/env bash
# train.cuda_graphs_loop_ahead: the loop's recordings ahead are captured while the GPU runs a
# replay (no device synchronisation first); the tests of the CUDA graphs and the recorder on one
# H200, the device-only ones among them (a recording ahead in the loop trains as one recorded at
# its first batch, without dropout). ~3 min from the repo root.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/bgout
timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_graph_recorder.py tests/test_cuda_graphs.py 2>&1 \
  | grep -E "^E|passed|failed|Error|SKIP" | head -60 | tee /tmp/bgout/pytest_cuda_loop_ahead.txt
