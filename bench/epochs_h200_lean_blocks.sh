#!/usr/bin/env bash
# Issue 15, goal 3's 2048 x 4 row on one H200: config/lean.yaml's blocks at unsloth's block peak
# (budget 5.75 GiB) recorded on cuDNN's attention measured 11,083 and 11,096 tok/s at 5.48 / 5.87
# GiB (bench/results/epochs_h200_lean_blocks, the batch-4 sitting), below unsloth's three block
# rows (11,215-11,457 tok/s at 5.75 / 6.14). Its steps took 0.74 s where the lean blocks eager took
# 0.69 s in the offload sitting (6.41 GiB reserved then, before expandable segments). This sitting
# separates the two differences, each twice, interleaved with the shipped overlay: torch's 32 MiB
# cuBLAS workspaces instead of lean's 8 MiB (the 8 MiB measured the same speed at batch 1 only),
# and the blocks eager (cuda_graphs_max_tokens 4096, the 7B config's) with expandable segments on.
# ~5 min from the repo root in the background (bg.sh start ... 420). Ran at commit b0de750, where
# config/lean.yaml recorded every block (cuda_graphs_max_tokens: null); it leaves them eager since,
# so its first two variants now need cuda_graphs_max_tokens=null to repeat this sitting.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1 --jobs block_2048x4 --recipes"
O="--out /tmp/bgout/epochs_h200_lean_blocks_2 --append"
LEAN="@config/lean.yaml,memory_budget_gib=5.75"
for _ in 1 2; do
  $E --variant "lean_yaml_5.75:$LEAN" $O
  $E --variant "lean_5.75_cublas_32mib:$LEAN,cublas_workspace_config=null" $O
  $E --variant "lean_5.75_eager:$LEAN,cuda_graphs_max_tokens=4096" $O
done
