"""The torch backend's per-image work: JPEG decoding (torchcodec, or torchvision.io where
torchcodec will not load) and the torchvision v2 train and validation transforms."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2


def _jpeg_decoder() -> Callable:
    """torchcodec's decode_jpeg; torchvision.io's where torchcodec will not load.

    torchcodec wheels are built against one torch release, so an image whose torch differs
    (a cluster's own PyTorch container) cannot load them; torchvision.io's decoder (the same
    libjpeg-turbo, deprecated from torchvision 0.29) keeps the backend working there.
    """
    try:
        from torchcodec.decoders import decode_jpeg

        return decode_jpeg
    except (ImportError, OSError, RuntimeError):
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode_jpeg

        def decode(data: bytes, mode: str) -> torch.Tensor:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return tv_decode_jpeg(raw, mode=getattr(ImageReadMode, mode))

        return decode


decode_jpeg = _jpeg_decoder()


def train_transform(
    image_size: int,
    random_resized_crop: bool,
    rrc_min_scale: float,
    crop_padding: int,
    hflip: bool,
    aug: tuple[str, int, int] = ("none", 0, 0),
) -> Callable:
    if random_resized_crop:
        ops = [v2.RandomResizedCrop(image_size, scale=(rrc_min_scale, 1.0), antialias=True)]
    else:
        ops = [v2.RandomCrop(image_size, padding=crop_padding or None, pad_if_needed=True)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if aug[0] != "none":
        ops.append(auto_augment(*aug))
    # uint8 CHW tensor in, uint8 CHW out (torch's uint8 antialiased resize is the fast path)
    return v2.Compose(ops)


# The fill of pixels that shears, translations and rotations uncover (DALI's default; both
# backends use it) and their interpolation (DALI's warp_affine default).
AUG_FILL = 128


def auto_augment(name: str, magnitude: int, num_ops: int) -> v2.Transform:
    """data.auto_augment as torchvision v2 implements it, on uint8 images (see
    distres.data.dali.graph.auto_augment_suite for DALI's same operators)."""
    common = dict(interpolation=v2.InterpolationMode.BILINEAR, fill=AUG_FILL)
    if name == "trivialaugment_wide":
        return v2.TrivialAugmentWide(num_magnitude_bins=31, **common)
    if name == "randaugment":
        return v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=31, **common)
    return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, **common)


def val_transform(image_size: int, resize: int) -> Callable:
    ops = [v2.Resize(resize, antialias=True)] if resize else []
    transform = v2.Compose([*ops, v2.CenterCrop(image_size)])
    # NOTE: JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale in the DCT domain, never below
    # the requested size, so a large val image headed for a `resize` short side decodes
    # cheaper (used when the short side is at least twice that size). Only before a resize:
    # a center crop alone of a reduced image would cover a larger part of the picture.
    transform.draft_size = resize or None
    return transform
