#!/usr/bin/env bash
# Issue 15, goal 4: where the eager 2048 x 4 step leaves the card idle (run: bench/README.md, "The
# recorded step's causal attention"; it found the recorded step's mask tensor). The
# fused-add sitting's profile had the card busy 81-85 % of the wall (bench/results/
# profile_step_h200_block_fused.json) and calling bitsandbytes' 4-bit linears directly did not
# change the step (epochs_h200_direct_linear). The 7B config's block step (fuse_lora_add on),
# eager and recorded (`graphs_all`: the kernels' times in a graph against eager, which measured
# slower in earlier sittings), each profiled over steps 6-9 with its timeline; then eager again
# with every thread's Python stacks. bench/trace_stalls.py splits each timeline's idle gaps by
# cause (`card_idle`: launched after the card ran dry, the Python call the host sat in and the
# sync before it, or waiting on the card). From the repo root with .carry/bench and .carry/epochs
# carried: ~5 min (bg.sh start ... 300).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
P="python3 bench/profile_step.py --lengths /tmp/epochs/lengths_b4_order.json --block 2048 --batch 4 --steps 14 --profile-from 6"
$P --variants base graphs_all --trace-dir /tmp/traces --out /tmp/bgout/profile_step_h200_block_idle.json
mkdir -p /tmp/traces_stacks
$P --variants base --python-stacks --trace-dir /tmp/traces_stacks --out /tmp/bgout/profile_step_h200_block_stacks.json
for trace in /tmp/traces/*.json.gz /tmp/traces_stacks/*.json.gz; do
  name=$(basename "$trace" .json.gz)
  python3 bench/trace_stalls.py "$trace" --out "/tmp/bgout/stalls_${name#trace_}.json" > /dev/null
done
ls -la /tmp/bgout
