"""Final weights: safetensors plus the model config that rebuilds the module."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from distres.config import ModelConfig
from distres.models import build_model

WEIGHTS, MODEL_CONFIG, INFERENCE = "model.safetensors", "model.yaml", "inference.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def save_weights(
    model: nn.Module | dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: str | os.PathLike
) -> Path:
    """Write `model.safetensors` (contiguous CPU tensors, torchvision key names for the
    ImageNet variants) and `model.yaml` next to it, from a model or its state dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = model if isinstance(model, dict) else unwrap(model).state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "model": model_cfg.name})
    (out / MODEL_CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(model_cfg), sort_keys=False))
    return out / WEIGHTS


def save_inference_info(out_dir: str | os.PathLike, cfg, classes: dict[str, int]) -> Path:
    """`inference.json` beside the weights: class names by index (from the shard manifest)
    and the validation preprocessing, all `python -m distres.predict` needs."""
    import json

    names = [""] * len(classes)
    for name, index in classes.items():
        names[index] = name
    info = {
        "classes": names,
        "image_size": cfg.data.image_size,
        "resize": cfg.data.val_resize,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "in_chans": cfg.model.in_chans,
    }
    path = Path(out_dir) / INFERENCE
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path


def load_weights(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild the model from `model.yaml` beside the weights and load them."""
    path = Path(path)
    cfg_path = path.with_name(MODEL_CONFIG)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: model config missing beside {path.name}")
    model = build_model(ModelConfig(**yaml.safe_load(cfg_path.read_text())))
    model.load_state_dict(load_file(str(path), device=map_location))
    return model.to(torch.device(map_location))


def checkpoint_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The model weights of a sharded checkpoint (any world size), consolidated in this one
    process, with the model config the checkpoint records."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from distres import checkpoint as ckpt

    path = Path(path)
    found = ckpt.find_resume(path, str(path)) if path.is_dir() else None
    if found is None:
        raise ckpt.CheckpointError(f"{path}: not a distres checkpoint directory")
    path, meta = found
    model_cfg = ModelConfig(**meta["model"])
    if meta.get("format") == "deepspeed":
        # DeepSpeed's own consolidation of the ZeRO partitions (its zero_to_fp32 tool)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed"), model_cfg
    model = build_model(model_cfg)
    state = {"model": get_model_state_dict(model)}
    ckpt.load_tensors(path, state)
    return state["model"], model_cfg


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
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        parser.error(f"--out {out}: must end in .safetensors")
    try:
        weights, model_cfg = checkpoint_weights(args.checkpoint)
    except (ckpt.CheckpointError, OSError) as e:
        print(f"distres.export: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(state, str(out), metadata={"format": "pt", "model": model_cfg.name})
    (out.with_name(MODEL_CONFIG)).write_text(
        yaml.safe_dump(dataclasses.asdict(model_cfg), sort_keys=False)
    )
    print(f"{out}: {len(state)} tensors of {model_cfg.name} from {args.checkpoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
