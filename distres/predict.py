"""`python -m distres.predict --weights final/model.safetensors IMAGE...`: the top-5 classes of
each image, with the class names from the training shards' manifest.

The model is rebuilt from `model.yaml` beside the weights; class names and the validation
preprocessing (resize the shorter side, center-crop, normalise) come from `inference.json`,
which training writes there too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from distres.export import INFERENCE, WeightsError, load_weights

INFO_KEYS = {
    "classes": list,
    "image_size": int,
    "resize": int,
    "mean": list,
    "std": list,
    "in_chans": int,
}


def read_inference_info(path: Path) -> dict:
    """`inference.json` beside the weights, checked; WeightsError naming it otherwise."""
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing (written by training beside the weights)") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    for key, kind in INFO_KEYS.items():
        if not isinstance(info.get(key), kind):
            raise WeightsError(f"{path}: {key!r} missing or not a {kind.__name__}")
    return info


def preprocess(info: dict) -> v2.Compose:
    ops = [v2.PILToTensor()]
    if info["resize"]:
        ops.append(v2.Resize(info["resize"], antialias=True))
    ops += [
        v2.CenterCrop(info["image_size"]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(info["mean"], info["std"]),
    ]
    return v2.Compose(ops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distres.predict", description=__doc__)
    parser.add_argument("--weights", required=True, help="final/model.safetensors of a run")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    weights = Path(args.weights)
    try:
        info = read_inference_info(weights.with_name(INFERENCE))
        model = load_weights(weights).eval()
    except WeightsError as e:
        print(f"distres.predict: {e}", file=sys.stderr)
        return 5
    transform = preprocess(info)
    mode = "RGB" if info["in_chans"] == 3 else "L"
    classes, k = info["classes"], min(args.top, len(info["classes"]))
    failed = 0
    for name in args.images:
        try:
            with Image.open(name) as img:
                x = transform(img.convert(mode))
        except (OSError, UnidentifiedImageError) as e:
            print(f"distres.predict: {name}: cannot read image ({e})", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            probs = model(x.unsqueeze(0)).softmax(dim=1)[0]
        top = probs.topk(k)
        ranked = ", ".join(
            f"{classes[i]} {p:.3f}"
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
        print(f"{name}: {ranked}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
