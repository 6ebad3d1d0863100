"""The per-operator comparison of auto-augmentations between implementations (torchvision v2
against DALI's suites, and against the GPU-decode stage's device operators)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from torchvision.transforms import v2

# The per-operator comparison: one test image, each operator alone at every magnitude the
# recipe can draw, 192 draws per backend; four statistics per draw (stats) whose distributions
# must agree (differ). The allowance on the means: 2 levels of 255 (or percent points of
# uncovered area); 4 for sharpness (DALI leaves a 1-pixel border) and 3 for equalize (DALI's
# follows OpenCV's lookup table, torchvision's PIL's; both documented; the test image's grain
# keeps its histogram free of the gaps where the two part most).
DRAWS, SIZE = 192, 48
ALLOWANCE = {"Sharpness": 4.0, "Equalize": 3.0}
# The geometric operators resample, so their interpolation shows in the output's roughness
# (mean absolute difference of neighbouring pixels): bilinear smooths the test image's grain,
# nearest-neighbour keeps it. Measured DALI/torchvision ratio of the mean roughness, both
# bilinear: 0.96-1.01; DALI switched to nearest: 1.24 for the shears, 1.43 for Rotate at
# RandAugment's m=18. (It also found DALI's own translations by fractions of a pixel, 0.8:
# blurred where torchvision shifts by whole pixels; dali_graph now shifts by whole pixels.)
GEOMETRIC, ROUGHNESS_TOL = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"), 0.1


def sample_image() -> np.ndarray:
    """A 48x48 RGB image with gradients, edges and texture (not a flat field that most
    operators leave alone)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    r = 40 + 3.5 * x
    g = 30 + 2.0 * y + 40 * (((x // 8) + (y // 8)) % 2)
    b = 128 + 90 * np.sin(x / 5) * np.cos(y / 7)
    img = np.stack([r, g, b], axis=-1)
    img[12:30, 16:36] = [220, 60, 40]
    # grain, so the histogram has no gaps (where equalize's two lookup tables part most)
    img += np.random.default_rng(0).normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def one_op_torch(name: str, op: str, magnitude: int) -> v2.Transform:
    base = v2.TrivialAugmentWide if name == "trivialaugment_wide" else v2.RandAugment

    class OneOp(base):
        _AUGMENTATION_SPACE: ClassVar[dict] = {op: base._AUGMENTATION_SPACE[op]}

    common = dict(interpolation=v2.InterpolationMode.BILINEAR, fill=128, num_magnitude_bins=31)
    if base is v2.RandAugment:
        return OneOp(num_ops=1, magnitude=magnitude, **common)
    return OneOp(**common)


def stats(outputs: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Per draw: mean absolute change, mean value, spread of values (levels of 255), and the
    share of pixels uncovered by a geometric operator (exactly the fill, which the test image
    never holds) in percent: how far shears, translations and rotations go."""
    x = outputs.astype(np.float32).reshape(len(outputs), -1)
    change = np.abs(x - image.astype(np.float32).reshape(1, -1)).mean(1)
    filled = (outputs == 128).all(-1).reshape(len(outputs), -1).mean(1) * 100
    return np.stack([change, x.mean(1), x.std(1), filled], axis=1)


def roughness(outputs: np.ndarray) -> float:
    x = outputs.astype(np.float32)
    return float((np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()) / 2)


def differ(a: np.ndarray, b: np.ndarray, allowance: float) -> bool:
    """Per statistic: a two-sample Kolmogorov-Smirnov distance with `allowance` of slack in
    the value (each CDF against the other's shifted by it, the Levy distance's form) over
    0.25; 192 draws of one distribution stay near 0.1. The slack absorbs systematic offsets of
    a fraction of a level (DALI rounds where torchvision truncates), which alone would put a
    plain KS distance at 1 for an operator with few distinct outcomes."""
    for i in range(a.shape[1]):
        x, y = np.sort(a[:, i]), np.sort(b[:, i])
        grid = np.union1d(x, y)

        def cdf(v, at):
            return np.searchsorted(v, at, side="right") / len(v)

        gap = max(
            (cdf(x, grid) - cdf(y, grid + allowance)).max(),
            (cdf(y, grid) - cdf(x, grid + allowance)).max(),
        )
        if gap > 0.25:
            return True
    return False
