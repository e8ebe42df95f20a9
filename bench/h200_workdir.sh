# Sourced (`. bench/h200_workdir.sh`) by the bench/*h200*.sh sittings, from the repository root
# on the GPU host: the offline environment, a copy of the checkout in /tmp/proj (the .carry
# packs left out), the prepared rows in /tmp/epochs (and the batch-4 epoch's row lengths in its
# order, /tmp/epochs/lengths_b4_order.json, with the tokenizer bench/profile_step.py builds its
# model with) and /tmp/bgout for the results (bg.sh brings it back); leaves the shell in /tmp/proj.
set -u
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
rm -rf /tmp/proj /tmp/epochs && mkdir -p /tmp/proj /tmp/bgout && tar --exclude=./.carry -c . | tar -x -C /tmp/proj
cp -r .carry/epochs /tmp/epochs && cd /tmp/proj
mkdir -p .carry/gpu /tmp/traces && cp -r /tmp/epochs/tokenizer .carry/gpu/shape
python3 -c "
import json
ids = json.load(open('/tmp/epochs/rows_b4.json'))['input_ids']
json.dump([len(row) for row in ids], open('/tmp/epochs/lengths_b4_order.json', 'w'))"
