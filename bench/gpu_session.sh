#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see docs/performance.md), about 9 minutes, most
# valuable first: the GPU JPEG decoder probe (bench/gpu_decode.py: nvJPEG speed, the vision
# issue 9606 corruption check, decoding under training load), the torch backend's CPU loader
# probe (bench/torch_loader_probe.py), the throughput grid of bench/train_throughput.py
# (ResNet-50, 224, batch 256, bf16, channels_last, eager vs torch.compile; synthetic and real
# data), then the trainer itself on the GPU over the same shards, then the embedded default
# run with fp16 (GradScaler). Logs go to $OUT, one file per part.
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

echo "== bench/gpu_decode.py"
timeout "${T_DECODE:-120}" python3 bench/gpu_decode.py --data-dir "$data" 2>&1 | tee "$OUT/decode.txt"

echo "== bench/torch_loader_probe.py"
timeout "${T_PROBE:-100}" python3 bench/torch_loader_probe.py --images 4096 2>&1 | tee "$OUT/probe.txt"

echo "== bench/train_throughput.py --preset gpu"
timeout "${T_BENCH:-240}" python3 bench/train_throughput.py --preset gpu --images 6144 \
    --workers "$workers" --data-dir "$data" 2>&1 | tee "$OUT/throughput.txt"

for compile in false ${TRAIN_COMPILE:-}; do
    echo "== distres.train: ResNet-50 on the GPU over the same shards, engine.compile=$compile"
    timeout "${T_TRAIN:-90}" torchrun --standalone --nproc_per_node=1 -m distres.train \
        model.name=resnet50 model.num_classes=10 data.dataset=shards \
        "data.train_shards=$data/train" "data.val_shards=$data/train" data.image_size=224 \
        data.val_resize=256 data.random_resized_crop=true data.hflip=true \
        "data.num_workers=$workers" train.batch_size=256 train.epochs=3 tracking.log_every=8 \
        engine.compile=$compile tracking.wandb=off tracking.progress=log \
        run.dir=/tmp/gpu_train_$compile 2>&1 | tee "$OUT/train_compile_$compile.txt"
    cp /tmp/gpu_train_$compile/metrics.jsonl "$OUT/train_compile_$compile.jsonl" 2>/dev/null
done

echo "== distres.train: the embedded default run, fp16 with GradScaler"
timeout "${T_DEFAULT:-45}" python3 -m distres.train train.precision=fp16 train.epochs=2 \
    tracking.wandb=off tracking.progress=false run.dir=/tmp/gpu_default 2>&1 | tail -n 15 | tee "$OUT/default.txt"
echo "== done"
