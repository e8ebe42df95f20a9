#!/usr/bin/env bash
# Issue 15, goal 2 on a second H200: the epoch half of bench/epochs_h200_revision2.sh (revision 2
# of the memory model's plans; config/batch4.yaml against the tutorial's recipe, a 12-step warm-up
# of each, then interleaved, twice, each a fresh process) into bench/results/epochs_h200_revision2_b4.
# ~9 min from the repository root in the background over two calls.
exec bash bench/epochs_h200_revision2.sh epochs_h200_revision2_b4 epochs
