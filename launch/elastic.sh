#!/usr/bin/env bash
# An elastic job (docs/elastic.md): run on every node; nodes may leave (a spot node reclaimed,
# a crash) and join (a replacement) while the job runs, between MIN_NODES and MAX_NODES.
#   STORE=login1:29400 MIN_NODES=1 MAX_NODES=4 JOB_ID=r50-0412 \
#     launch/elastic.sh --config configs/resnet50_imagenet.yaml [k=v ...]
# The rendezvous store runs outside every agent, on a host that stays up (start it first):
#   python -m distres.launch store --port 29400
# A membership change restarts every rank from the latest checkpoint (written on the way out
# when a node joins; the last periodic one when a node is lost: set checkpoint.every_minutes).
# JOB_ID must be new for each job: a finished job closes its rendezvous in the store.
set -euo pipefail
: "${STORE:?set STORE to host:port of python -m distres.launch store}"
: "${JOB_ID:?set JOB_ID to an id unique to this job}"
GPUS="${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
exec "${DISTRES_PYTHON:-python3}" -m distres.launch \
    --nnodes="${MIN_NODES:-1}:${MAX_NODES:-2}" --nproc_per_node="${GPUS:-1}" \
    --rdzv_backend=c10d --rdzv_endpoint="${STORE}" --rdzv_id="${JOB_ID}" \
    --rdzv-conf="is_host=false,last_call_timeout=${LAST_CALL_S:-10},keep_alive_interval=${HEARTBEAT_S:-5},keep_alive_max_attempt=3" \
    --max-restarts="${MAX_RESTARTS:-10}" --monitor-interval="${MONITOR_S:-2}" -- "$@"
