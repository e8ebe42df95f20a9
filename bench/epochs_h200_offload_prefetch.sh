#!/usr/bin/env bash
# Issue 15, goal 3: config/lean.yaml's blocks with the offloaded inputs brought back ahead of
# their recomputation (train.offload_prefetch, on by default) against in line (false, as
# measured in epochs_h200_unsloth_current, where the lean blocks spread 12,560 / 12,161 /
# 10,231 tok/s against unsloth's 11,582-11,610), three runs each interleaved, unsloth's blocks
# twice between them; then the GPU tests of the offloaded copies (tests/test_offload.py: the
# side stream's copies against plain checkpointing bit for bit). unsloth's layer as in
# bench/epochs_h200_unsloth_current.sh (a second call carrying .carry/unsloth runs
# bench/unsloth_install.sh while the first rows run). ~9 min from the repo root in the
# background (bg.sh start ... 540, then waits of 560).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_offload_prefetch --append"
LEAN="--jobs block_2048x4 --recipes --variant lean_yaml_5.75:@config/lean.yaml,memory_budget_gib=5.75"
IN_LINE="--jobs block_2048x4 --recipes --variant lean_5.75_in_line:@config/lean.yaml,memory_budget_gib=5.75,offload_prefetch=false"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_offload.py 2>&1 \
  | grep -E "^E |^FAILED|^ERROR|^SKIPPED|passed|failed" | head -40 | tee /tmp/bgout/pytest_cuda_offload_prefetch.txt
$E $O $LEAN
$E $O $IN_LINE
for _ in $(seq 300); do [ -f /tmp/unsloth-site/unsloth/__init__.py ] && break; sleep 2; done
[ -f /tmp/unsloth-site/unsloth/__init__.py ] || { echo "unsloth's layer did not arrive in 600 s"; exit 1; }
$E $O --jobs block_2048x4 --recipes unsloth
$E $O $IN_LINE
$E $O $LEAN
$E $O --jobs block_2048x4 --recipes unsloth
$E $O $LEAN
$E $O $IN_LINE
