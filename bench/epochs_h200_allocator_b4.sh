#!/usr/bin/env bash
# Issue 15, sixth run, second part (bench/results/epochs_h200_allocator, appended after the
# unsloth rows of bench/epochs_h200_allocator.sh, whose last line it replaces): at batch 4 the
# lean job held ~1.2 GiB more than it allocated, where its batch-1 job held 0.25 GiB more. Batches
# over cuda_graphs_max_tokens train eagerly in the general pool while the recordings keep their
# own pool, so the job holds both. Rows: 8 MiB cuBLAS workspaces alone, and with every batch
# recorded (one pool). ~5 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_allocator --append"
LEAN="offload_checkpoints=true,double_quant=true,memory_budget_gib=4.84,CUBLAS_WORKSPACE_CONFIG=:4096:2:16:8"
$E $O --jobs epoch_b4 --recipes --variant "lean_4.84_workspace_8mib:$LEAN" \
  --variant "lean_4.84_workspace_8mib_all_recorded:$LEAN,cuda_graphs_max_tokens=null"
