#!/usr/bin/env bash
# On the GPU host, from the repository root with .carry/unsloth beside it (bench/unsloth_layer.sh):
# unsloth's layer into /tmp/unsloth-site, whole or not at all (the sitting scripts wait for
# /tmp/unsloth-site/unsloth/__init__.py), then what imports from it.
set -eu
rm -rf /tmp/unsloth-site.part
python3 -m pip install -q --no-deps --target /tmp/unsloth-site.part .carry/unsloth/wheels/*.whl
rm -rf /tmp/unsloth-site && mv /tmp/unsloth-site.part /tmp/unsloth-site
PYTHONPATH=/tmp/unsloth-site:/tmp/site python3 -c "
import importlib.metadata as m
for p in ('unsloth', 'unsloth_zoo', 'trl', 'datasets', 'transformers', 'peft', 'torch', 'bitsandbytes'):
    print(p, m.version(p))
import unsloth  # needs the card
print('unsloth imports')" 2>&1 | grep -v "^$" | tail -12
