"""data.auto_augment on the device, for the GPU-decode stage: torchvision v2's RandAugment,
TrivialAugmentWide and AutoAugment (ImageNet policy), applied to whole batches.

Worker side (`AutoAugmentDraw`): each image's operators, magnitudes and signs are drawn by v2's
own `forward`, on a stride-0 stand-in of the image's size, with the transform's
`_apply_image_or_video_transform` recording what it was asked to do instead of doing it. So
the draws are v2's calls in v2's order on the worker's seeded RNG: a sample gets the operators
the CPU path would give it, and a resume replays them exactly. A geometric operator's inverse
affine matrix is computed there too, with torchvision's own `_get_inverse_affine_matrix` and
the arguments v2 passes it.

Device side (`apply`): for each operator slot, the images are grouped by operator and each group
is done in one go: the geometric operators (shears, translations, rotation) as one batched
affine warp, the colour operators with a per-image factor, threshold or mask, AutoContrast,
Equalize and Invert by torchvision's batched kernels. The arithmetic is v2's on uint8 images
(float blend, clamp, truncation to uint8; grid_sample with the mask channel for the fill,
then rounding), so each image matches what v2 gives for the same draw, to a level where float
rounding lands on the other side of an integer.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

try:  # where torchvision's affine and rotate take their matrices from
    from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix
except ImportError:  # pragma: no cover (torchvision < 0.16)
    from torchvision.transforms.functional import _get_inverse_affine_matrix

OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
    "Invert",
)  # fmt: skip
OP_ID = {name: i for i, name in enumerate(OPS)}
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_GEOMETRIC = np.array([OP_ID[n] for n in GEOMETRIC_OPS])
GEOMETRIC_KEY = len(OPS)  # the group of every geometric operator: one affine warp
# per operator slot: the operator (-1: none), its signed magnitude, the inverse affine matrix
OP, MAGNITUDE, MATRIX, SLOT = 0, 1, 2, 8
AUTO_AUGMENTS = (v2.RandAugment, v2.TrivialAugmentWide, v2.AutoAugment)


def slots(op: v2.Transform) -> int:
    """Operators one image can get from `op`, in order."""
    if isinstance(op, v2.RandAugment):
        return op.num_ops
    return 2 if isinstance(op, v2.AutoAugment) else 1


class AutoAugmentDraw:
    """Worker side: what `op` would do to a height x width image, as slots(op) * SLOT floats."""

    def __init__(self, op: v2.Transform, channels: int = 3):
        if not isinstance(op, AUTO_AUGMENTS):
            raise TypeError(f"{type(op).__name__} is not one of {AUTO_AUGMENTS}")
        interpolation = getattr(op.interpolation, "value", op.interpolation)
        if interpolation != "bilinear":
            raise ValueError(f"the device auto-augmentation is bilinear, not {interpolation}")
        # a copy: the caller's transform keeps applying its operators (the CPU path's may be
        # the same object); on the copy, an instance attribute shadows the class's method
        self.op, self.channels, self.slots = copy.copy(op), channels, slots(op)
        self.drawn: list[tuple[str, float]] = []
        self.op._apply_image_or_video_transform = self._record

    def _record(self, image, transform_id, magnitude, interpolation, fill):
        self.drawn.append((transform_id, float(magnitude)))
        return image

    def __call__(self, height: int, width: int) -> list[float]:
        self.drawn = []
        # query_size reads only the shape: a stride-0 view stands for the image, no pixels
        self.op(torch.empty(1, dtype=torch.uint8).expand(self.channels, height, width))
        out = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0] * self.slots
        for k, (name, magnitude) in enumerate(self.drawn):
            matrix = _matrix(name, magnitude, height, width)
            out[k * SLOT : (k + 1) * SLOT] = [float(OP_ID[name]), magnitude, *matrix]
        return out


def _matrix(name: str, m: float, height: int, width: int) -> list[float]:
    """The inverse affine matrix torchvision's affine/rotate would sample with, for the
    arguments v2's `_apply_image_or_video_transform` passes (identity for other operators)."""
    corner = [-width * 0.5, -height * 0.5]  # center=[0, 0] in torchvision's centred pixels
    if name == "ShearX":
        return _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0,
                                          [math.degrees(math.atan(m)), 0.0])  # fmt: skip
    if name == "ShearY":
        return _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0,
                                          [0.0, math.degrees(math.atan(m))])  # fmt: skip
    if name == "TranslateX":
        return _get_inverse_affine_matrix([0.0, 0.0], 0.0, [float(int(m)), 0.0], 1.0, [0.0, 0.0])
    if name == "TranslateY":
        return _get_inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, float(int(m))], 1.0, [0.0, 0.0])
    if name == "Rotate":
        # rotate_image: angle % 360, then the matrix of -angle (its fast paths for 0, 90, 180
        # and 270 degrees give the same pixels as this warp)
        return _get_inverse_affine_matrix([0.0, 0.0], -(m % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def apply(images: torch.Tensor, params: torch.Tensor, fill: float) -> torch.Tensor:
    """Every image's drawn operators, in order. images: N x C x H x W uint8 on the device;
    params: N x (slots * SLOT) float64 on the host (each row from AutoAugmentDraw)."""
    host = params.numpy()
    device = images.device
    n_slots = host.shape[1] // SLOT
    # per slot, the numbers v2 computes in double precision before its float32 arithmetic
    # (ratio = 1 + m, alpha = 1 - ratio, the solarize threshold), to the device once, pinned
    mags = host[:, MAGNITUDE::SLOT]
    derived = np.concatenate([1.0 + mags, 1.0 - (1.0 + mags), 255.0 * mags], axis=1)
    table = _to(torch.from_numpy(np.concatenate([host, derived], axis=1)).float(), device)
    for s in range(n_slots):
        ops = host[:, s * SLOT + OP].astype(np.int64)
        # one group per operator, the geometric ones together (one warp): sorted by group,
        # each group is a slice of one gathered copy, so no gather and scatter per group
        key = np.where(np.isin(ops, _GEOMETRIC), GEOMETRIC_KEY, ops)
        work = (key >= 0) & (key != OP_ID["Identity"])
        if not work.any():
            continue
        order = np.flatnonzero(work)
        order = order[np.argsort(key[order], kind="stable")]
        keys, starts = np.unique(key[order], return_index=True)
        index = _to(torch.from_numpy(order), device)
        columns = [s * SLOT + k for k in range(SLOT)]
        columns += [n_slots * SLOT + j * n_slots + s for j in range(3)]
        # this slot's SLOT columns, then ratio, alpha, threshold, in group order
        cols = table[:, columns].index_select(0, index)
        sub = images.index_select(0, index)
        for k, a, b in zip(keys.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)],
                           strict=True):  # fmt: skip
            name = None if k == GEOMETRIC_KEY else OPS[k]
            sub[a:b] = _op(name, sub[a:b], cols[a:b], fill)
        images.index_copy_(0, index, sub)
    return images


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # from pinned memory the copy does not stall the host
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


RATIO, ALPHA, THRESHOLD = SLOT, SLOT + 1, SLOT + 2


def _op(name: str | None, x: torch.Tensor, p: torch.Tensor, fill: float) -> torch.Tensor:
    """One operator on a group of uint8 images; p: the group's columns on the device."""
    per_image = lambda k: p[:, k].view(-1, 1, 1, 1)  # noqa: E731
    ratio, alpha = per_image(RATIO), per_image(ALPHA)
    if name is None:
        return _warp(x, p[:, MATRIX:SLOT].reshape(-1, 2, 3), fill)
    if name == "Brightness":
        return _uint8(x.float() * ratio)
    if name == "Color":
        return _blend(x, _gray(x), ratio, alpha) if x.shape[1] == 3 else x
    if name == "Contrast":
        gray = _gray(x) if x.shape[1] == 3 else x.float()
        return _blend(x, gray.mean(dim=(-3, -2, -1), keepdim=True), ratio, alpha)
    if name == "Sharpness":
        return _sharpness(x, alpha)
    if name == "Posterize":  # keep the top int(m) bits
        bits = per_image(MAGNITUDE).trunc().to(torch.int32)
        mask = ((1 << bits) - 1) << (8 - bits)
        return torch.where(bits >= 8, x, x & mask.to(torch.uint8))
    if name == "Solarize":
        return torch.where(x >= per_image(THRESHOLD), 255 - x, x)
    return {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize, "Invert": TF.invert}[name](x)


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0, 255).to(torch.uint8)  # truncates, as v2's .to(image.dtype)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """v2's grayscale of uint8 images for blending: float, floored."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _blend(x: torch.Tensor, other: torch.Tensor, ratio, alpha) -> torch.Tensor:
    """v2's _blend with a ratio per image: x * ratio + other * (1 - ratio), clamped, cast."""
    return _uint8(torch.addcmul(x.float().mul_(ratio), other, alpha))


def _sharpness(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """v2's adjust_sharpness with a factor per image (alpha = 1 - factor): the 3x3 smoothing
    kernel, rounded, blended into the interior (the one-pixel border is kept)."""
    c, h, w = x.shape[-3:]
    if h <= 2 or w <= 2:
        return x
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], device=x.device)
    out = x.float()
    blurred = F.conv2d(out, kernel.expand(c, 1, 3, 3), groups=c).round_()
    view = out[..., 1:-1, 1:-1]
    view.addcmul_(blurred.sub_(view), alpha)
    return _uint8(out)


def _warp(x: torch.Tensor, theta: torch.Tensor, fill: float) -> torch.Tensor:
    """torchvision's affine_image / rotate_image (bilinear, expand=False) with a matrix per
    image: its _affine_grid and _apply_grid_transform, batched."""
    n, c, h, w = x.shape
    base = torch.empty(1, h, w, 3, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device))
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device)
    base[..., 1].copy_(ys.unsqueeze(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h], device=x.device)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta.transpose(1, 2).div(scale))
    img = torch.cat([x.float(), torch.ones(n, 1, h, w, device=x.device)], dim=1)
    img = F.grid_sample(img, grid.view(n, h, w, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # fmt: skip
    img, mask = img[:, :c], img[:, c:]
    return img.sub_(fill).mul_(mask).add_(fill).round_().to(torch.uint8)
