#!/usr/bin/env bash
# Builds unsloth's package layer for the GPU host (no network there) on a machine that reaches the
# package registry: the wheels, for Python 3.12, into .carry/unsloth/wheels (~50 MB; gitignored).
# unsloth 2026.10.9 pins trl <= 1.15 and datasets < 5, so its rows run in their own interpreter with
# this layer first on the path (bench/unsloth_row.py); the host's torch, transformers, peft,
# accelerate, bitsandbytes (the pipeline's layer) and the rest serve both. On the host:
# bash bench/unsloth_install.sh. Usage, from the repository root: bash bench/unsloth_layer.sh
set -eu
out=.carry/unsloth/wheels
rm -rf "$out" && mkdir -p "$out"
get() { pip download -q --no-deps -d "$out" --python-version 3.12 --only-binary :all: "$@"; }
get unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 "fsspec==2026.2.0" \
  tyro docstring_parser typeguard cut_cross_entropy einops json5 structlog nest_asyncio \
  typer rich markdown_it_py mdurl shellingham click diffusers dill==0.4.1
get --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
  sentencepiece msgspec hf_transfer torchao multiprocess==0.70.19 xxhash
ls "$out" | wc -l && du -sh "$out"
