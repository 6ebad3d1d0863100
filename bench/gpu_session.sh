#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see docs/performance.md), under 9 minutes (one
# device command may run 10), most valuable first: the GPU JPEG decoder probe
# (bench/gpu_decode.py: nvJPEG speed, the vision issue 9606 corruption check, decoding under
# training load), the throughput grid of bench/train_throughput.py (ResNet-50, 224, batch
# 256, bf16, channels_last, eager vs torch.compile; synthetic, and real data decoded by
# DataLoader workers and by the GPU-decode stage, data.decode=gpu), the trainer itself on the
# GPU with data.decode=gpu, host syncs per step (bench/host_syncs.py), and CUDA graphs
# (engine.compile_mode=reduce-overhead). Logs go to $OUT, one file per part.
#
#   bash bench/gpu_session.sh            # on the GPU machine, from the repository root
#
# Python packages missing there travel as wheels in .whl/ (omegaconf, antlr4, webdataset,
# braceexpand): nothing beyond torch and torchvision is assumed. Fill it on a machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl omegaconf==2.4.0 \
#       antlr4-python3-runtime==4.13.2 webdataset==1.0.2 braceexpand==0.1.7
# (the versions this was run with; the target's Python version goes in --python-version).
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
data=/tmp/distres_bench_data
workers=$(( $(nproc) - 2 ))

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"

echo "== torchcodec (carried in .whl/ if at all): does it load on this torch?"
python3 -c "import torchcodec; print('torchcodec', torchcodec.__version__, 'loads')" 2>&1 | tail -n 1 | tee -a "$OUT/gpu.txt"

echo "== bench/gpu_decode.py"
timeout "${T_DECODE:-90}" python3 bench/gpu_decode.py --data-dir "$data" 2>&1 | tee "$OUT/decode.txt"

echo "== bench/train_throughput.py --preset gpu: synthetic vs real, data.decode=cpu and gpu"
timeout "${T_BENCH:-240}" python3 bench/train_throughput.py --preset gpu --images 6144 \
    --workers "$workers" --data-dir "$data" --decode cpu,gpu --steps 30 --warmup 10 \
    2>&1 | tee "$OUT/throughput.txt"

echo "== distres.train: ResNet-50 on the GPU over the same shards, data.decode=gpu"
timeout "${T_TRAIN:-75}" torchrun --standalone --nproc_per_node=1 -m distres.train \
    model.name=resnet50 model.num_classes=10 data.dataset=shards data.backend=torch \
    "data.train_shards=$data/train" "data.val_shards=$data/train" data.image_size=224 \
    data.val_resize=256 data.random_resized_crop=true data.hflip=true data.decode=gpu \
    "data.num_workers=$workers" train.batch_size=256 train.epochs=3 tracking.log_every=8 \
    tracking.wandb=off tracking.progress=log run.dir=/tmp/gpu_train \
    "tracking.profile_steps=[26,29]" tracking.ledger=true \
    2>&1 | tee "$OUT/train_decode_gpu.txt"
# the profile's table is in the log and metrics.jsonl (the trace itself is too big to carry)
cp /tmp/gpu_train/metrics.jsonl "$OUT/train_decode_gpu.jsonl" 2>/dev/null
cp /tmp/gpu_train/plots/confusion_val.png /tmp/gpu_train/ledger/val.json "$OUT/" 2>/dev/null

echo "== bench/host_syncs.py: host-device syncs per step (ResNet-50, shards, data.decode=gpu)"
timeout "${T_SYNC:-60}" python3 bench/host_syncs.py model.name=resnet50 model.num_classes=10 \
    data.dataset=shards data.backend=torch "data.train_shards=$data/train" \
    "data.val_shards=$data/train" data.image_size=224 data.random_resized_crop=true \
    data.decode=gpu "data.num_workers=$workers" train.batch_size=256 train.max_steps=60 \
    tracking.log_every=20 train.ema_decay=0.9998 2>&1 | tail -n 25 | tee "$OUT/host_syncs.txt"

echo "== bench/ema.py: the EMA of the weights, time per update"
timeout "${T_EMA:-60}" python3 bench/ema.py --models resnet50,resnext101_32x8d 2>&1 | tee "$OUT/ema.txt"

echo "== bench/train_throughput.py: engine.compile_mode=reduce-overhead (CUDA graphs), synthetic"
timeout "${T_GRAPHS:-60}" python3 bench/train_throughput.py --preset gpu --no-real \
    --compile reduce-overhead --steps 30 --warmup 10 2>&1 | tee "$OUT/graphs.txt"
echo "== done"
