#!/usr/bin/env bash
# Issue 15, goal 2: where the batch-4 epoch's time goes outside its steps, and the ceilings of the
# levers left, on one H200. First bench/varlen_attention.py: one layer's attention over the epoch's
# batches as the shipped recipe pads them (cuDNN, flash) and with each batch's rows packed into one
# row (varlen_attn). Then a 12-step warm-up of each recipe (Triton's kernels compile once per
# machine) and, interleaved, the tutorial's recipe and config/batch4.yaml twice each (every row
# now carries outside_steps: the trainer's set-up, the gaps before, between and after the steps),
# config/batch4.yaml padded to multiples of 32 (more shapes, less padding: 29 recordings against
# 16) and at a 10 GiB budget (what recomputing layers at 8 GiB costs the epoch; not a goal row).
# ~19 min from the repo root in two calls (bg.sh start ... 540, then bg.sh wait 560).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 bench/varlen_attention.py --rows /tmp/epochs/rows_b4.json --out /tmp/bgout/varlen_attention_h200.json
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_outside --append --jobs epoch_b4 --recipes"
OVERLAY="@config/batch4.yaml"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes tutorial --steps 12
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "batch4:$OVERLAY" --steps 12
$E $B4 tutorial
$E $B4 --variant "batch4:$OVERLAY"
$E $B4 --variant "batch4_budget10:$OVERLAY,memory_budget_gib=10"
$E $B4 tutorial
$E $B4 --variant "batch4:$OVERLAY"
$E $B4 --variant "batch4_pad32:$OVERLAY,pad_to_multiple_of=32"
