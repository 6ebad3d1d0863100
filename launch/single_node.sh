#!/usr/bin/env bash
# One node, every GPU (or GPUS=N): launch/single_node.sh --config configs/resnet50_imagenet.yaml [k=v ...]
# torchrun through distres.launch: the exit code is the workers' (3 preempted, 4 non-finite...).
set -euo pipefail
GPUS="${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
exec "${DISTRES_PYTHON:-python3}" -m distres.launch --standalone --nproc_per_node="${GPUS:-1}" -- "$@"
