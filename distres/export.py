"""Final weights: safetensors plus the model config that rebuilds the module."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from distres.config import ConfigError, ModelConfig
from distres.models import build_model

WEIGHTS, MODEL_CONFIG, INFERENCE = "model.safetensors", "model.yaml", "inference.json"


class WeightsError(ValueError):
    """Weights or their model config that cannot be used; the message names the file."""


def write_safetensors(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> Path:
    """safetensors' own serialisation with its JSON header in sorted key order, written
    atomically: the library emits the metadata from a hash map, in an order that changes from
    process to process, so two saves of the same tensors could differ byte for byte."""
    path = Path(path)
    blob = safetensors_bytes(state, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    header_bytes = header.encode() + b" " * (-len(header) % 8)  # data stays 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        f.write(memoryview(blob)[8 + n :])
    os.replace(tmp, path)
    return path


def write_model_files(
    weights: dict[str, torch.Tensor], model_cfg: ModelConfig, path: str | os.PathLike
) -> Path:
    """`path` (safetensors: contiguous CPU tensors) and `model.yaml` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    write_safetensors(state, path, {"format": "pt", "model": model_cfg.name})
    path.with_name(MODEL_CONFIG).write_text(
        yaml.safe_dump(dataclasses.asdict(model_cfg), sort_keys=False)
    )
    return path


def save_weights(
    weights: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: str | os.PathLike
) -> Path:
    """Write `model.safetensors` (contiguous CPU tensors, torchvision key names for the
    ImageNet variants) and `model.yaml` into out_dir."""
    return write_model_files(weights, model_cfg, Path(out_dir) / WEIGHTS)


def save_inference_info(out_dir: str | os.PathLike, cfg, classes: dict[str, int]) -> Path:
    """`inference.json` beside the weights: class names by index (from the shard manifest)
    and the validation preprocessing, all `python -m distres.predict` needs."""
    path = Path(out_dir) / INFERENCE
    path.write_text(json.dumps(inference_info(cfg, classes), indent=1) + "\n")
    return path


def inference_info(cfg, classes: dict[str, int]) -> dict:
    """Class names by index and the validation preprocessing of a run's config."""
    from distres.ledger import class_names

    # One name per output; a class map shorter than the head (shards whose labels do not reach
    # every class) leaves the index as the name.
    return {
        "classes": class_names(classes, cfg.model.num_classes),
        "image_size": cfg.data.eval_size,  # the evaluation crop (data.val_size)
        "resize": cfg.data.val_resize,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "in_chans": cfg.model.in_chans,
    }


def read_model_config(path: Path) -> ModelConfig:
    """`model.yaml` (safe YAML: plain values only) as a ModelConfig; WeightsError otherwise."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: model config missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: not a model config ({first})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: not a model config (expected a mapping of model keys)")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(map(str, raw)) - known)
    if unknown:
        raise WeightsError(f"{path}: unknown model key(s) {', '.join(unknown)}")
    try:
        return ModelConfig(**raw)
    except ConfigError as e:
        raise WeightsError(f"{path}: {e}") from None


def load_weights(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild the model from `model.yaml` beside the weights and load them; every failure is
    a WeightsError naming the file."""
    path = Path(path)
    model = build_model(read_model_config(path.with_name(MODEL_CONFIG)))
    try:
        state = load_file(str(path), device=map_location)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise WeightsError(
            f"{path}: weights do not fit {model.__class__.__name__} ({detail})"
        ) from None
    return model.to(torch.device(map_location))


def checkpoint_weights(
    path: str | os.PathLike, trust: bool = False, ema: bool = False
) -> tuple[dict[str, torch.Tensor], ModelConfig, Path]:
    """The model weights of a sharded checkpoint (any world size), consolidated in this one
    process, with the model config the checkpoint records and the checkpoint used (the newest
    complete one, for a directory of them). Nothing is unpickled beyond
    tensors and the checkpoint formats' own classes unless `trust` (DeepSpeed's files only).
    ema=True: the EMA of the weights instead (train.ema_decay)."""
    from distres import checkpoint as ckpt

    path = Path(path)
    found = ckpt.find_resume(path, str(path)) if path.is_dir() else None
    if found is None:
        raise ckpt.CheckpointError(f"{path}: not a distres checkpoint directory")
    path, meta = found
    try:
        model_cfg = ModelConfig(**meta["model"])
    except (TypeError, ConfigError) as e:
        raise ckpt.CheckpointError(f"{path / ckpt.META}: bad model config ({e})") from None
    if ema and "ema" not in meta["tensors"].get("parts", []):
        raise ckpt.CheckpointError(
            f"{path}: holds no EMA of the weights (its run had train.ema_decay=0)"
        )
    reader = ckpt.tensor_format(path, meta)
    part = "ema" if ema else "model"
    weights = reader.consolidated_weights(path, meta, build_model(model_cfg), trust, part)
    return weights, model_cfg, path


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from distres import checkpoint as ckpt
    from distres.serving import FORMATS, OPSET, ServingError, export, preprocess_path

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
    except (ckpt.CheckpointError, WeightsError, ServingError, OSError) as e:
        print(f"distres.export: {e}", file=sys.stderr)
        codes = {ckpt.CheckpointError: 5, ServingError: 4}
        return codes.get(type(e), 2)
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


def serving_info(final: Path | None, checkpoint: Path) -> dict:
    """The preprocessing and class names: final/inference.json, or the checkpoint's config
    (class names from its shard set's manifest, when it can be read here)."""
    import tempfile

    from distres import checkpoint as ckpt
    from distres.config import load_config
    from distres.predict import read_inference_info

    if final is not None:
        return read_inference_info(final / INFERENCE)
    meta = ckpt.read_meta(checkpoint)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(meta["config"])
        f.flush()
        cfg = load_config(f.name)
    try:
        from distres.data import resolve_shard_sets

        classes = resolve_shard_sets(cfg)[0].classes
    except Exception:  # the shards are elsewhere: the class indexes stand for names
        classes = {}
    return inference_info(cfg, classes)


if __name__ == "__main__":
    raise SystemExit(main())
