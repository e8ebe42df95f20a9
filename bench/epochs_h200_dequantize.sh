#!/usr/bin/env bash
# Issue 15, twelfth run on one H200 (bench/results/epochs_h200_dequantize), after
# bench/epochs_h200_layers.sh: train.dequantize triton (scripts/nf4_dequantize.py, the same values
# as bitsandbytes' kernel, which took 20 of 147 ms of a recorded 4 x 512 step). First the CUDA
# tests (bit equality) and the kernel bench (bench/dequantize.py), then a 30-step warm-up and
# batch-4 epochs: multiples of 128 with each kernel, the tutorial's, multiples of 128 with the
# allocator's expandable segments (the layers plan held 8.19 GiB reserved at 7.50 allocated), and
# the 7B config (multiples of 64). ~9 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_nf4_dequantize.py 2>&1 | grep -E "^E|passed|failed" | head -20 \
  | tee /tmp/bgout/pytest_cuda_dequantize.txt
python3 bench/dequantize.py --out /tmp/bgout/dequantize_h200.json
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_dequantize --append"
$E --out /tmp/bgout/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $O --jobs epoch_b4 --recipes --variant "pad128:pad_to_multiple_of=128"
$E $O --jobs epoch_b4 --recipes --variant "pad128_bnb:pad_to_multiple_of=128,dequantize=bitsandbytes"
$E $O --jobs epoch_b4 --recipes tutorial
$E $O --jobs epoch_b4 --recipes --variant "pad128_expandable:pad_to_multiple_of=128,expandable_segments=true"
$E $O --jobs epoch_b4 --recipes pipeline
# Then, in two more calls on the same machine (as run): the blocks with each kernel, and the
# kernel at 8 warps (bench/dequantize.py's fastest launch; the default since).
$E $O --jobs block_2048x4 --recipes pipeline
$E $O --jobs block_2048x4 --recipes --variant "blocks_bnb:dequantize=bitsandbytes"
sed -i 's/^WARPS = 4$/WARPS = 8/' scripts/nf4_dequantize.py
$E $O --jobs epoch_b4 --recipes --variant "pad128_expandable_warps8:pad_to_multiple_of=128,expandable_segments=true"
$E $O --jobs block_2048x4 --recipes --variant "blocks_warps8:dequantize=triton"
