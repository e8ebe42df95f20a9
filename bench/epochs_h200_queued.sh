#!/usr/bin/env bash
# Issue 15, tenth run on one H200 (bench/results/epochs_h200_queued), after
# bench/epochs_h200_nosync{,_2}.sh: with the host no longer waiting on the GPU each step, a
# batch-4 epoch spent 12.7 s of ~51 s in its 16 first-of-shape steps (7.0 s for 8 shapes at
# pad_to_multiple_of 128). torch.cuda.graph waits for the GPU and empties the allocator's caches
# before each capture; train.cuda_graphs_capture: queued captures at once. Rows: a 30-step warm-up
# (the Triton kernels compiled before the measured rows), then batch-4 epochs at multiples of 128
# queued and synchronized, the tutorial's, and multiples of 64 queued. CUDA tests first.
# ~8 min from the repo root in the background. The tutorial's row ended the sitting (its time was up);
# the last row did not run. train.cuda_graphs_capture was removed after this run (no faster,
# 1.9 GiB more reserved): the queued rows now run the synchronized capture.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "never_wait or queued_capture" 2>&1 \
  | grep -E "^E|passed|failed" | head -20 | tee /tmp/bgout/pytest_cuda_queued.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_queued --append"
$E --out /tmp/bgout/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 30
$E $O --jobs epoch_b4 --recipes --variant "pad128_queued:pad_to_multiple_of=128,cuda_graphs_capture=queued"
$E $O --jobs epoch_b4 --recipes --variant "pad128:pad_to_multiple_of=128"
$E $O --jobs epoch_b4 --recipes tutorial
$E $O --jobs epoch_b4 --recipes --variant "queued:cuda_graphs_capture=queued"
