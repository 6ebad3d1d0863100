"""`python -m distres.export CHECKPOINT|FINAL_DIR --out FILE [--format ...]`: one safetensors
file (torchvision's key names for the ImageNet variants) and model.yaml beside it, or a serving
export (ONNX, TorchScript, pt2) checked against the PyTorch model."""

from __future__ import annotations

import argparse
from pathlib import Path

from distres import errors
from distres.artifacts.consolidate import checkpoint_weights
from distres.artifacts.final import (
    MODEL_CONFIG,
    WEIGHTS,
    load_weights,
    read_model_config,
    serving_info,
    write_model_files,
)
from distres.models import build_model

PROG = "distres.export"


def main(argv: list[str] | None = None) -> int:
    from distres.artifacts.serving import FORMATS, OPSET, export, preprocess_path

    parser = argparse.ArgumentParser(
        prog="python -m distres.export",
        description="Consolidate a sharded checkpoint into one safetensors file (plus "
        "model.yaml beside it; ImageNet variants keep torchvision's key names), or export a "
        "checkpoint or a final/ directory for serving: --format onnx (dynamic batch), "
        "torchscript or pt2 (torch.export), each with <name>.preprocess.json beside it and "
        "checked against the PyTorch model (onnxruntime for ONNX).",
    )
    parser.add_argument(
        "checkpoint", help="a checkpoint (step-N), a directory of them, or a final/ directory"
    )
    parser.add_argument(
        "--out", required=True, help="FILE.safetensors | .onnx | .pt (torchscript) | .pt2"
    )
    parser.add_argument(
        "--format", choices=("safetensors", *FORMATS), default="safetensors", help="what to write"
    )
    parser.add_argument("--opset", type=int, help=f"ONNX opset (default {OPSET})")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="DeepSpeed checkpoints: load with DeepSpeed's full unpickler (only for "
        "checkpoints you wrote; the default admits tensors and DeepSpeed's own classes)",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="the EMA of the weights (a run with train.ema_decay > 0) instead of the weights",
    )
    args = parser.parse_args(argv)
    out, fmt = Path(args.out), args.format
    suffixes = (".safetensors",) if fmt == "safetensors" else FORMATS[fmt]
    if out.suffix not in suffixes:
        parser.error(f"--out {out}: --format {fmt} writes {' or '.join(suffixes)}")
    if args.opset is not None and fmt != "onnx":
        parser.error("--opset applies to --format onnx")
    source = Path(args.checkpoint)
    final = source if (source / WEIGHTS).is_file() else None
    if final is not None and args.ema:
        parser.error(f"--ema: {source} holds one set of weights (final/); export a checkpoint")
    try:
        if final is not None:
            model_cfg, used = read_model_config(final / MODEL_CONFIG), final
            weights = load_weights(final / WEIGHTS).state_dict()
        else:
            weights, model_cfg, used = checkpoint_weights(source, args.trust_checkpoint, args.ema)
        if fmt == "safetensors":
            write_model_files(weights, model_cfg, out)
        else:
            model = build_model(model_cfg)
            model.load_state_dict(weights)
            info = serving_info(final, used)
            check = export(model, fmt, out, info, args.opset or OPSET)
    except errors.DistresError as e:
        return errors.report(PROG, e)
    except OSError as e:  # a file nobody anticipated (unreadable, vanished)
        return errors.report(PROG, errors.from_os_error(e))
    what = "the EMA of " if args.ema else ""
    print(f"{out}: {len(weights)} tensors of {what}{model_cfg.name} from {used}")
    if fmt != "safetensors":
        opset = f", opset {args.opset or OPSET}" if fmt == "onnx" else ""
        print(f"  {fmt}{opset}, dynamic batch; preprocessing: {preprocess_path(out)}")
        if check["checked"]:
            print(
                f"  parity with PyTorch under {check['runner']}: max |diff| "
                f"{check['max_abs_diff']:.2e} (tolerance {check['tolerance']})"
            )
        else:
            print(f"  parity NOT checked: {check['why']} (pip install 'distres[onnx]')")
    return 0
