#!/usr/bin/env bash
# DeepSpeed's launcher: one node (GPUS=N), or HOSTFILE=path ("node1 slots=8" per line).
#   launch/deepspeed.sh --config configs/resnet50_imagenet.yaml engine.zero_stage=2 [k=v ...]
set -euo pipefail
if [ -n "${HOSTFILE:-}" ]; then
    exec deepspeed --hostfile "${HOSTFILE}" --module distres.train engine.name=deepspeed "$@"
fi
GPUS="${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
exec deepspeed --num_gpus "${GPUS:-1}" --module distres.train engine.name=deepspeed "$@"
