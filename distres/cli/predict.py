"""`python -m distres.predict --weights final/model.safetensors IMAGE...`: the top-5 classes of
each image, with the class names from the training shards' manifest.

The model is rebuilt from `model.yaml` beside the weights; class names and the validation
preprocessing (resize the shorter side, center-crop, normalise) come from `inference.json`,
which training writes there too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from distres import errors
from distres.artifacts.final import INFERENCE, load_weights, read_inference_info

PROG = "distres.predict"


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
    except errors.DistresError as e:
        return errors.report(PROG, e)
    except OSError as e:  # a file nobody anticipated (unreadable, vanished)
        return errors.report(PROG, errors.from_os_error(e))
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
    return errors.USAGE if failed else errors.OK


if __name__ == "__main__":
    raise SystemExit(main())
