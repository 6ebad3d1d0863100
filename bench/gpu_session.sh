#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the figures docs/performance.md waits for, most
# valuable first, inside one device command with room for a rerun.
#
#   bash bench/gpu_session.sh --prepare     # HERE, once: fill .whl/ with the wheels below
#   device run: command "bash bench/gpu_session.sh", carry [".whl"], timeout_s 560
#   bash bench/gpu_session.sh --rehearse    # HERE: every step on CPU stand-ins, tiny sizes
#
# What must travel: the working tree (tracked files) and `.whl/` (git-ignored, so name it in
# `carry`): pure-Python wheels the GPU image lacks, for its Python 3.12: omegaconf,
# antlr4-python3-runtime, webdataset, braceexpand (about 0.5 MB). Nothing else: torch,
# torchvision, numpy, PIL, rich, safetensors, timm, scikit-learn and pytest are in the image
# (device README, KINDS.md); DALI cannot travel (too large), so real data is the torch
# backend. The script installs the wheels into /tmp/site and checks every import before its
# first step; a missing one stops it there, saying what to prepare.
#
# Budget: one device command may run 600 s and a session has 900 s of device time, starts
# included; this plans for BUDGET=450 s (7.5 minutes) so a rerun on the warm machine fits.
# Each step has a planned time; a step that would not fit in what is left is skipped (said
# in the log and the table), and a running step is cut (timeout -k) at the deadline, so
# the packing at the end always runs. Steps, most valuable first:
#   tests       pytest -m gpu tests/test_gpu.py: the stage's pixels on cuda, hand-over under
#               load, resume on cuda, no host sync in a training step
#   decode      bench/gpu_decode.py: nvJPEG rates, the stage's rates (with TrivialAugment-wide
#               on the device), its host cost, the vision 9606 corruption check, under load
#   eager       bench/train_throughput.py, ResNet-50 224 bf16 b256 eager: synthetic, input
#               pipeline alone and real data decoded by workers (cpu) and by the stage (gpu),
#               with and without TrivialAugment-wide
#   compiled    the same compiled (torch.compile), the stage only
#   train       distres.train ResNet-50 with data.decode=gpu and the v2 recipe's
#               augmentation, a profile window and the ledger
#   syncs       bench/host_syncs.py: the training thread's host syncs per step
#   graphs, ema if time is left: CUDA graphs (compile_mode=reduce-overhead), the EMA update
#
# Output ($OUT, at most 8 files come back): table.txt (each target, the measured figure,
# pass or fail), session.log (everything printed), logs.tar.gz (each step's log and JSON,
# the trainer's metrics, ledger and confusion picture).
set -uo pipefail
MODE=gpu
case "${1:-}" in
    --rehearse) MODE=rehearse ;;
    --prepare) MODE=prepare ;;
    "") ;;
    *) echo "usage: bash bench/gpu_session.sh [--rehearse|--prepare]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
WHEELS="omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 webdataset==1.0.2 braceexpand==0.1.7"
IMPORTS="omegaconf,antlr4,webdataset,braceexpand,rich,safetensors,PIL,numpy,torchvision"

if [ "$MODE" = prepare ]; then
    mkdir -p .whl
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl $WHEELS \
        || exit 1
    ls -l .whl
    exit 0
fi

BUDGET=${BUDGET:-450}
# each GPU step's planned seconds (from the H200 runs of 2026-11-28/30: torch import ~6 s, a
# cold Inductor compile of ResNet-50 forward and backward ~60 s, loader start-up ~8 s a row)
# and the time it is cut at
declare -A PLAN=([tests]=60 [decode]=50 [eager]=90 [compiled]=110 [train]=60 [syncs]=40
    [graphs]=100 [ema]=25)
declare -A CUT=([tests]=90 [decode]=80 [eager]=130 [compiled]=160 [train]=90 [syncs]=60
    [graphs]=130 [ema]=40)
CORE="tests decode eager compiled train syncs"  # graphs and ema run if time is left
core=0; for s in $CORE; do core=$(( core + PLAN[$s] )); done
START=$(date +%s)
if [ "$MODE" = rehearse ]; then
    OUT=${OUT:-$(mktemp -d /tmp/gpu-session-rehearsal.XXXXXX)}
else
    OUT=${OUT:-bench_out}
fi
mkdir -p "$OUT/logs"
LOGS=$OUT/logs
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

echo "== gpu_session ($MODE) $(date -u +%FT%TZ), budget ${BUDGET} s, output in $OUT"
echo "== GPU plan: core steps ($CORE) ${core} s of ${BUDGET} s;" \
    "a step is cut at the deadline; one command may run 600 s"
if [ "$MODE" = gpu ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "== stop: the carried wheels did not install"; exit 3; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import ${IMPORTS}; import distres.data, distres.config" 2>"$LOGS/imports.txt"; then
    cat "$LOGS/imports.txt"
    echo "== stop: a module is missing (above). Here: bash bench/gpu_session.sh --prepare,"
    echo "   then carry .whl (wheels: $WHEELS)"
    exit 3
fi
echo "imports: ok ($IMPORTS, distres)"
if [ "$MODE" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
        | tee "$LOGS/gpu.txt"
    DEV=(); WORKERS=$(( $(nproc) - 2 ))
else
    echo "rehearsal: CPU stand-ins for the GPU, tiny sizes; the figures mean nothing" \
        | tee "$LOGS/gpu.txt"
    DEV=(--device cpu); WORKERS=1
fi
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    | tee -a "$LOGS/gpu.txt"
DATA=/tmp/distres_bench_data
[ "$MODE" = rehearse ] && DATA=$(mktemp -d /tmp/gpu-session-data.XXXXXX)

# step NAME PLANNED_S TIMEOUT_S COMMAND...: run it if its plan fits in what is left, cut at
# the deadline (SIGTERM, then SIGKILL 10 s later: a trainer trapping SIGTERM stops too).
PLANNED=0
step() {
    local name=$1 plan=$2 limit=$3
    shift 3
    PLANNED=$(( PLANNED + plan ))
    local now=$(( $(date +%s) - START ))
    local left=$(( BUDGET - 15 - now ))  # 15 s kept for the table and the packing
    if [ "$plan" -gt "$left" ]; then
        echo "== step $name: skipped (plans ${plan} s, ${left} s left)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== step $name: start at ${now} s (plans ${plan} s, cut at ${limit} s)"
    timeout -k 10 "$limit" "$@" > >(tee "$LOGS/$name.txt") 2>&1
    local rc=$?
    echo "== step $name: rc=$rc after $(( $(date +%s) - START - now )) s"
}

if [ "$MODE" = gpu ]; then
    # GPU sizes: ResNet-50, 224, batch 256, bf16; an epoch of 12,800 images (50 batches), so
    # no timed window crosses an epoch boundary (warm-up 10 + 30 steps + 2)
    plan() { echo "${PLAN[$1]}" "${CUT[$1]}"; }
    # shellcheck disable=SC2046
    step tests $(plan tests) python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
    # shellcheck disable=SC2046
    step decode $(plan decode) python3 bench/gpu_decode.py --data-dir "$DATA" --images 2048 \
        --iterations 20 --seconds 10 --json "$LOGS/decode.json"
    TP=(--preset gpu --images 12800 --data-dir "$DATA" --workers "$WORKERS" --steps 30
        --warmup 10)
    # shellcheck disable=SC2046
    step eager $(plan eager) python3 bench/train_throughput.py "${TP[@]}" --compile off \
        --decode cpu,gpu --augment none,trivialaugment_wide --json "$LOGS/eager.json"
    # shellcheck disable=SC2046
    step compiled $(plan compiled) python3 bench/train_throughput.py "${TP[@]}" --compile on \
        --decode gpu --augment none,trivialaugment_wide --no-pipe --json "$LOGS/compiled.json"
    TRAIN=(model.name=resnet50 model.num_classes=10 data.dataset=shards data.backend=torch
        "data.train_shards=$DATA/train" "data.val_shards=$DATA/train" data.image_size=224
        data.val_resize=256 data.random_resized_crop=true data.decode=gpu
        data.auto_augment=trivialaugment_wide data.random_erasing=0.1
        "data.num_workers=$WORKERS" train.batch_size=256)
    RUN=$(mktemp -d /tmp/gpu_train.XXXXXX)  # fresh: a rerun never resumes this one
    # shellcheck disable=SC2046
    step train $(plan train) torchrun --standalone --nproc_per_node=1 -m distres.train \
        "${TRAIN[@]}" train.epochs=1 train.max_steps=50 tracking.log_every=10 \
        tracking.progress=log "tracking.profile_steps=[30,33]" tracking.ledger=true \
        "run.dir=$RUN"
    # shellcheck disable=SC2046
    step syncs $(plan syncs) python3 bench/host_syncs.py --json "$LOGS/syncs.json" \
        "${TRAIN[@]}" train.max_steps=60 tracking.log_every=20 train.ema_decay=0.9998
    # shellcheck disable=SC2046
    step graphs $(plan graphs) python3 bench/train_throughput.py --preset gpu --no-real \
        --compile reduce-overhead --steps 30 --warmup 10 --json "$LOGS/graphs.json"
    # shellcheck disable=SC2046
    step ema $(plan ema) python3 bench/ema.py --models resnet50
else
    step tests 25 120 env DISTRES_GPU_TESTS_ON=cpu python3 -m pytest -m gpu tests/test_gpu.py \
        -q -p no:cacheprovider
    step decode 15 120 python3 bench/gpu_decode.py "${DEV[@]}" --data-dir "$DATA" --images 32 \
        --batch 16 --iterations 2 --seconds 1 --json "$LOGS/decode.json"
    TP=(--preset cpu --models resnet18 --batches 8 --size 64 --precisions fp32 --images 96
        --data-dir "$DATA/tp" --workers 1 --steps 2 --warmup 1 "${DEV[@]}")
    step eager 25 120 python3 bench/train_throughput.py "${TP[@]}" --compile off \
        --decode cpu,gpu --augment none,trivialaugment_wide --json "$LOGS/eager.json"
    # torch.compile on a CPU costs minutes of C++ compiling: the stand-in runs eager
    step compiled 15 120 python3 bench/train_throughput.py "${TP[@]}" --compile off \
        --decode gpu --augment none,trivialaugment_wide --no-pipe --json "$LOGS/compiled.json"
    RUN=$(mktemp -d /tmp/gpu_train.XXXXXX)
    step train 25 120 python3 -m distres.train run.device=cpu model.name=resnet18 \
        model.num_classes=10 data.dataset=shards data.backend=torch \
        "data.train_shards=$DATA/tp/train" "data.val_shards=$DATA/tp/train" \
        data.image_size=64 data.val_resize=72 data.random_resized_crop=true data.decode=gpu \
        data.auto_augment=trivialaugment_wide data.num_workers=1 train.batch_size=8 \
        train.epochs=1 train.max_steps=4 tracking.log_every=2 tracking.progress=log \
        "tracking.profile_steps=[2,3]" tracking.ledger=true "run.dir=$RUN"
    step syncs 5 60 python3 bench/host_syncs.py --json "$LOGS/syncs.json"
    step graphs 5 60 python3 -c "print('stand-in: CUDA graphs need a GPU')"
    step ema 10 60 python3 bench/ema.py --models resnet18 --repeats 2
fi
cp "$RUN/metrics.jsonl" "$LOGS/train_metrics.jsonl" 2>/dev/null
cp "$RUN/plots/confusion_val.png" "$RUN"/ledger/val.* "$LOGS/" 2>/dev/null
echo "== planned ${PLANNED} s of a ${BUDGET} s budget (one command may run 600 s)"
python3 bench/session_table.py "$LOGS" --mode "$MODE" --planned "$PLANNED" --budget "$BUDGET" \
    | tee "$OUT/table.txt"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
[ "$MODE" = rehearse ] && rm -rf "$DATA" "$RUN"
echo "== done in $(( $(date +%s) - START )) s: $(ls "$OUT" | tr '\n' ' ')"
