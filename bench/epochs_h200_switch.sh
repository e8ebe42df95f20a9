#!/usr/bin/env bash
# Issue 15, run on one H200 at commit a92f002 -> bench/results/epochs_h200_switch_b4.{json,md},
# profile_recorder_backward_h200.json, trace_stalls_recorder_backward_h200.json, pytest_cuda_switch.txt.
# cuda_graphs_switch_interval measured no gain and was removed after it: this script is the
# record of what the sitting ran (its switch rows need that commit, its pad64_coarse128_ahead rows
# the coarse_steps default of then, 50; now 100). (1) Python's switch interval
# while the recorder thread runs (train.cuda_graphs_switch_interval). The thread's captures take
# more CPU time on their thread than the loop's (0.19-0.75 s against 0.15-0.22 s) and wait longer
# besides (bench/results/epochs_h200_gc_b4); the loop waited 1.55-3.0 s an epoch for it. Three
# threads share the GIL then: the loop, the recorder and autograd's device thread, where a
# background capture's backward calls a Python saved-tensor hook per saved tensor; Python lets a
# thread running Python keep the GIL 5 ms from one waiting for it. Each capture's backward is now
# timed apart (cuda_graphs.captured_backward_seconds). (2) Multiples of 64 recorded ahead with the
# first 50 batches on multiples of 128 (train.cuda_graphs_coarse_multiple): 8 shapes to record
# first, then 64's finer padding for steps 50-249 (7.6 % of the tokens padding against 13.6 %;
# the thread then records the finer shapes while the second megabatch may need them: one row with
# the first 100 batches coarse).
# The CUDA recorder and coarse-shape tests first, a 12-step warm-up, then multiples of 128
# recorded ahead with Python's 5 ms and with 0.5 ms twice each, the tutorial twice, interleaved,
# and the coarse-first rows (twice, and once with 100 batches); last the profile of steps 5-9 with Python stacks and its
# trace_stalls (``beside``: autograd's device thread's stretches during a capture's backward and
# the Python calls inside them). ~18.5 min from the repo root in the background (bg.sh start ...
# 540, then a wait of 560 and a short one).
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k "recording_ahead or recorder or coarse" 2>&1 \
  | grep -E "^E|passed|failed|Error" | head -40 | tee /tmp/bgout/pytest_cuda_switch.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
B4="--out /tmp/bgout/epochs_h200_switch_b4 --append --jobs epoch_b4 --recipes"
AHEAD="pad_to_multiple_of=128,cuda_graphs_capture=ahead"
COARSE="pad_to_multiple_of=64,cuda_graphs_capture=ahead,cuda_graphs_coarse_multiple=128"
$E --out /tmp/warmup_h200 --jobs epoch_b4 --recipes pipeline --steps 12
$E $B4 tutorial
$E $B4 --variant "pad128_ahead:$AHEAD"
$E $B4 --variant "pad128_ahead_switch_0.5ms:$AHEAD,cuda_graphs_switch_interval=0.0005"
$E $B4 tutorial
$E $B4 --variant "pad128_ahead_switch_0.5ms:$AHEAD,cuda_graphs_switch_interval=0.0005"
$E $B4 --variant "pad128_ahead:$AHEAD"
$E $B4 --variant "pad64_coarse128_ahead:$COARSE"
$E $B4 --variant "pad64_coarse128_100_ahead:$COARSE,cuda_graphs_coarse_steps=100"
$E $B4 --variant "pad64_coarse128_ahead:$COARSE"
python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 12 --profile-from 5 \
  --variants pad128_ahead_log10 --python-stacks --trace-dir /tmp/traces --out /tmp/bgout/profile_recorder_backward_h200.json
python3 bench/trace_stalls.py /tmp/traces/trace_profile_recorder_backward_h200_pad128_ahead_log10.json.gz \
  --out /tmp/bgout/trace_stalls_recorder_backward_h200.json > /dev/null
