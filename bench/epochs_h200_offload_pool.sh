#!/usr/bin/env bash
# Issue 15, goal 3: the prefetched inputs allocated from the compute stream's pool. In
# epochs_h200_offload_prefetch the copies back were allocated on the side stream, whose pool
# took its own segment: lean's blocks reserved 6.45-6.90 GiB against 5.96-6.14 in line and
# unsloth's 6.385. The GPU tests of the offloaded copies first (tests/test_offload.py: no
# segment of the side stream's left), then lean's blocks with the prefetch (three runs) and in
# line (two), interleaved. ~5 min from the repository root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_offload_pool --append"
LEAN="--jobs block_2048x4 --recipes --variant lean_yaml_5.75:@config/lean.yaml,memory_budget_gib=5.75"
IN_LINE="--jobs block_2048x4 --recipes --variant lean_5.75_in_line:@config/lean.yaml,memory_budget_gib=5.75,offload_prefetch=false"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_offload.py 2>&1 \
  | grep -E "^E |^FAILED|^ERROR|^SKIPPED|passed|failed" | head -40 | tee /tmp/bgout/pytest_cuda_offload_pool.txt
$E $O $LEAN
$E $O $IN_LINE
$E $O $LEAN
$E $O $IN_LINE
$E $O $LEAN
