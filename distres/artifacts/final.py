"""What a run leaves in final/ (and `distres.export` writes beside a file it consolidates):
the weights as safetensors, `model.yaml` that rebuilds the module, `inference.json` with the
class names and the validation preprocessing. This module is their one reader and writer."""

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
from distres.data.api import class_names
from distres.errors import WeightsError
from distres.io import atomic_write, read_json_object, write_json
from distres.models import build_model

WEIGHTS, MODEL_CONFIG, INFERENCE = "model.safetensors", "model.yaml", "inference.json"
INFO_KEYS = {
    "classes": list,
    "image_size": int,
    "resize": int,
    "mean": list,
    "std": list,
    "in_chans": int,
}


def write_safetensors(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> Path:
    """safetensors' own serialisation with its JSON header in sorted key order, written
    atomically: the library emits the metadata from a hash map, in an order that changes from
    process to process, so two saves of the same tensors could differ byte for byte."""
    blob = safetensors_bytes(state, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    header_bytes = header.encode() + b" " * (-len(header) % 8)  # data stays 8-byte aligned
    body = memoryview(blob)[8 + n :]
    return atomic_write(path, len(header_bytes).to_bytes(8, "little") + header_bytes + body)


def write_model_files(
    weights: dict[str, torch.Tensor], model_cfg: ModelConfig, path: str | os.PathLike
) -> Path:
    """`path` (safetensors: contiguous CPU tensors) and `model.yaml` beside it."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    write_safetensors(state, path, {"format": "pt", "model": model_cfg.name})
    atomic_write(
        path.with_name(MODEL_CONFIG), yaml.safe_dump(dataclasses.asdict(model_cfg), sort_keys=False)
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
    return write_json(Path(out_dir) / INFERENCE, inference_info(cfg, classes), indent=1)


def inference_info(cfg, classes: dict[str, int]) -> dict:
    """Class names by index and the validation preprocessing of a run's config."""
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


def read_inference_info(path: Path) -> dict:
    """`inference.json` beside the weights, checked; WeightsError naming it otherwise."""
    if not Path(path).exists():
        raise WeightsError(f"{path}: missing (written by training beside the weights)")
    info = read_json_object(path, WeightsError)
    for key, kind in INFO_KEYS.items():
        if not isinstance(info.get(key), kind):
            raise WeightsError(f"{path}: {key!r} missing or not a {kind.__name__}")
    return info


def record_best_size(final: Path, sizes: list[tuple[int, int]], top1: list[float]) -> Path:
    """Record the best evaluation size (by top-1, the smaller on a tie) and its resize in
    `final`/inference.json (what distres.predict then uses). sizes: (size, resize) pairs."""
    path = Path(final) / INFERENCE
    if not path.exists():
        raise WeightsError(f"{path}: missing (a run with checkpoint.save_final=true writes it)")
    info = read_json_object(path, WeightsError)
    best = max(range(len(sizes)), key=lambda i: (top1[i], -sizes[i][0]))
    info["image_size"], info["resize"] = sizes[best]
    info["sizes_evaluated"] = {str(s): round(t, 6) for (s, _), t in zip(sizes, top1, strict=True)}
    return write_json(path, info, indent=1)


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


def serving_info(final: Path | None, checkpoint: Path) -> dict:
    """The preprocessing and class names: final/inference.json, or the checkpoint's config
    (class names from its shard set's manifest, when it can be read here)."""
    import tempfile

    from distres import checkpoint as ckpt
    from distres.config import load_config

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
