#!/usr/bin/env bash
# Issue 15, goal 3: config/lean.yaml's blocks as shipped now (the offloaded inputs prefetched,
# from the compute stream's pool: bench/epochs_h200_offload_pool.sh) against unsloth's in one
# sitting, three lean runs and two of unsloth's interleaved; the host link's copy rate
# (bench/host_link.py) before every run and after the last, to set the lean runs' spread
# against it. unsloth's layer as in bench/epochs_h200_unsloth_current.sh (a second call
# carrying .carry/unsloth runs bench/unsloth_install.sh while the first lean row runs).
# ~5 min from the repository root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_offload_unsloth --append"
LEAN="--jobs block_2048x4 --recipes --variant lean_yaml_5.75:@config/lean.yaml,memory_budget_gib=5.75"
LINK="python3 bench/host_link.py --out /tmp/bgout/host_link.jsonl --label"
$LINK before_lean_1 && $E $O $LEAN
for _ in $(seq 300); do [ -f /tmp/unsloth-site/unsloth/__init__.py ] && break; sleep 2; done
[ -f /tmp/unsloth-site/unsloth/__init__.py ] || { echo "unsloth's layer did not arrive in 600 s"; exit 1; }
$LINK before_unsloth_1 && $E $O --jobs block_2048x4 --recipes unsloth
$LINK before_lean_2 && $E $O $LEAN
$LINK before_unsloth_2 && $E $O --jobs block_2048x4 --recipes unsloth
$LINK before_lean_3 && $E $O $LEAN
$LINK after_lean_3
