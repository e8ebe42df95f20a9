#!/usr/bin/env bash
# Issue 15, prepared for the next sitting (not yet run): does the card idle before a recording?
# Capturing without waiting for the GPU gained nothing (bench/results/epochs_h200_queued), as if
# the host were never ahead of the card when a new batch shape arrives. The batch-4 epoch's own
# order at multiples of 128 (its second shape, 4 x 896, records at step 8): steps 5-9 profiled with
# their timeline, and every recording's drain_seconds (the wait for the queued steps) in the
# graph summary of the epoch row after it. ~4 min from the repo root in the background.
. bench/h200_workdir.sh  # the environment, /tmp/proj, /tmp/epochs, /tmp/bgout
mkdir -p .carry/gpu /tmp/traces && cp -r /tmp/epochs/tokenizer .carry/gpu/shape
python3 -c "
import json
ids = json.load(open('/tmp/epochs/rows_b4.json'))['input_ids']
json.dump([len(row) for row in ids], open('/tmp/epochs/lengths_b4_order.json', 'w'))"
python3 bench/profile_step.py --batch 4 --lengths /tmp/epochs/lengths_b4_order.json --steps 14 --profile-from 5 \
  --variants pad128 --trace-dir /tmp/traces --out /tmp/bgout/profile_recording_gap_h200.json
tar -C /tmp -czf /tmp/bgout/traces_recording_gap_h200.tgz traces
python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1 --out /tmp/bgout/epochs_h200_drain \
  --jobs epoch_b4 --recipes --variant "pad128:pad_to_multiple_of=128"
