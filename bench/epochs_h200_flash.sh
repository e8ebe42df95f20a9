#!/usr/bin/env bash
# Issue 15, thirteenth run on one H200 (bench/results/epochs_h200_flash), after
# bench/epochs_h200_dequantize.sh: where a batch-4 epoch's recordings spend their host time. The one
# recording profiled (bench/results/recording_profile_h200_b4_512.json) spent 1.1 of 2.7 s inside
# SDPA's cuDNN calls and 1.1 s in the backward's C++: cuDNN builds a plan per new sequence length.
# First the attention kernels per shape (bench/attention_check.py: first call, first recording and
# steady time of cuDNN, flash and memory-efficient at every padded batch-4 length), then a 30-step
# warm-up and batch-4 epochs: the tutorial's, multiples of 128 with cuDNN or flash attention in the
# recordings (train.cuda_graphs_attention), and the same at multiples of 64 (the 7B config's).
# ~9 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 bench/attention_check.py --out /tmp/bgout/attention_shapes_h200.json \
  --shapes 4x128 4x256 4x384 4x512 4x640 4x768 4x896 4x1024 4x2048
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_flash --append"
$E --out /tmp/bgout/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $O --jobs epoch_b4 --recipes --variant "pad128:pad_to_multiple_of=128"
$E $O --jobs epoch_b4 --recipes --variant "pad128_flash:pad_to_multiple_of=128,cuda_graphs_attention=flash"
$E $O --jobs epoch_b4 --recipes tutorial
$E $O --jobs epoch_b4 --recipes --variant "pad64_flash:cuda_graphs_attention=flash"
$E $O --jobs epoch_b4 --recipes pipeline
