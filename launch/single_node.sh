#!/usr/bin/env bash
# One node, every GPU (or GPUS=N): launch/single_node.sh --config configs/resnet50_imagenet.yaml [k=v ...]
set -euo pipefail
GPUS="${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
exec torchrun --standalone --nproc_per_node="${GPUS:-1}" -m distres.train "$@"
