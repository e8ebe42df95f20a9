#!/usr/bin/env bash
# Issue 15, goal 2: train.warm_up_beside_load on one H200. The batch-4 epoch's first, eager step
# takes 1.66-2.0 s where the same batch replays in 0.30 s (bench/results/epochs_h200_revision2_b4):
# the libraries' one-time set-up. With the switch a thread makes those first calls while the model
# loads (scripts/warm_up.py). First the GPU tests of tests/test_warm_up.py; then a 12-step warm-up of
# each recipe (Triton's disk cache); then the tutorial's recipe, config/batch4.yaml and the same with
# the switch, each a fresh process, twice (the two pipeline rows in the other order the second time).
# ~12 min from the repository root in the background over two calls. The switch was removed after
# this sitting (no gain: bench/README.md); the script is its record and runs at commit 0685a18.
NAME=${1:-epochs_h200_warm_up}
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_warm_up.py > /tmp/bgout/pytest_cuda_warm_up.txt 2>&1
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/$NAME --append --jobs epoch_b4 --recipes"
OVERLAY="@config/batch4.yaml"
COLD="batch4:$OVERLAY"
WARM="batch4_warm_up:$OVERLAY,warm_up_beside_load=true"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes tutorial --steps 12
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "$COLD" --steps 12
$E --out /tmp/warmup_h200 --append --jobs epoch_b4 --recipes --variant "$WARM" --steps 12
$E $B4 tutorial
$E $B4 --variant "$COLD"
$E $B4 --variant "$WARM"
$E $B4 tutorial
$E $B4 --variant "$WARM"
$E $B4 --variant "$COLD"
