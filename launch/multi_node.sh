#!/usr/bin/env bash
# Several nodes by hand: run on every node with the same MASTER (the first node's address).
#   NNODES=4 MASTER=node1 launch/multi_node.sh --config configs/resnet50_imagenet.yaml [k=v ...]
# c10d rendezvous: no node ranks to hand out; nodes may join in any order. torchrun through
# distres.launch: the exit code is the workers' (3 preempted, 4 non-finite loss, ...).
set -euo pipefail
: "${NNODES:?set NNODES}" "${MASTER:?set MASTER to the host name of the first node}"
GPUS="${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
exec "${DISTRES_PYTHON:-python3}" -m distres.launch --nnodes="${NNODES}" \
    --nproc_per_node="${GPUS:-1}" --rdzv_backend=c10d --rdzv_endpoint="${MASTER}:${PORT:-29500}" \
    --rdzv_id="${RDZV_ID:-distres}" -- "$@"
