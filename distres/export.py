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
    # One name per output; a class map shorter than the head (shards whose labels do not reach
    # every class) leaves the index as the name.
    names = [str(i) for i in range(cfg.model.num_classes)]
    for name, index in classes.items():
        if 0 <= index < len(names):
            names[index] = name
    info = {
        "classes": names,
        "image_size": cfg.data.eval_size,  # the evaluation crop (data.val_size)
        "resize": cfg.data.val_resize,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "in_chans": cfg.model.in_chans,
    }
    path = Path(out_dir) / INFERENCE
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path


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

    parser = argparse.ArgumentParser(
        prog="python -m distres.export",
        description="Consolidate a sharded checkpoint into one safetensors file (plus "
        "model.yaml beside it). ImageNet variants keep torchvision's key names.",
    )
    parser.add_argument("checkpoint", help="a checkpoint (step-N) or a directory of them")
    parser.add_argument("--out", required=True, help="FILE.safetensors")
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
    out = Path(args.out)
    if out.suffix != ".safetensors":
        parser.error(f"--out {out}: must end in .safetensors")
    try:
        weights, model_cfg, used = checkpoint_weights(
            args.checkpoint, args.trust_checkpoint, args.ema
        )
        write_model_files(weights, model_cfg, out)
    except (ckpt.CheckpointError, OSError) as e:
        print(f"distres.export: {e}", file=sys.stderr)
        return 5 if isinstance(e, ckpt.CheckpointError) else 2
    what = "the EMA of " if args.ema else ""
    print(f"{out}: {len(weights)} tensors of {what}{model_cfg.name} from {used}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
