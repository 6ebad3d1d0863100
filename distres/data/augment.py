"""Training augmentation of whole batches on the device, after the loader: the same code for
DALI, the torch backend and its GPU-decode stage (timm applies random erasing and mixing in
its GPU prefetcher for the same reason).

In timm's order: color jitter (per image, on 0-1 pixels), random erasing (per image, on
normalised pixels, per-pixel normal noise: timm's mode "pixel"), then mixup or cutmix (per
batch, partner = the batch reversed, as timm) with soft targets that fold label smoothing in.
Evaluation never passes through here.

Every random draw is a function of (run seed, rank, optimizer step, micro-batch): the small
per-image parameters come from a NumPy generator on the host (no host-device sync: they travel
with the batch), the erasing noise from a device generator seeded the same way. A resume,
mid-epoch or on another world size, draws exactly what an uninterrupted run would have; the
checkpoint's step is this part's whole state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from distres.data.api import Batch

# ITU-R 601 luma, as torchvision's rgb_to_grayscale
_LUMA = (0.2989, 0.587, 0.114)
_TAG = 0x6D6978  # keeps these streams apart from any other user of the same seed words


@dataclass(frozen=True)
class BatchAugmentSpec:
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.0

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @property
    def enabled(self) -> bool:
        return self.mixing or self.color_jitter > 0 or self.random_erasing > 0


class BatchAugment:
    """Augments the micro-batches of one optimizer step (see the module doc)."""

    def __init__(self, spec: BatchAugmentSpec, seed: int, rank: int, device: torch.device):
        self.spec, self.seed, self.rank, self.device = spec, seed, rank, torch.device(device)
        self.last: list[dict] = []  # what the last call drew, per micro-batch (for tests)
        self._consts: dict = {}  # device constants, made once (a copy per batch would sync)

    def __call__(self, micro_batches: list[Batch], step: int) -> list[Batch]:
        self.last = []
        return [self.batch(b, step, i) for i, b in enumerate(micro_batches)]

    def batch(self, batch: Batch, step: int, micro: int) -> Batch:
        words = [_TAG, self.seed & 0xFFFF_FFFF, self.rank, step, micro]
        rng = np.random.default_rng(words)
        images, labels = batch
        drawn: dict = {}
        s = self.spec
        if s.color_jitter > 0:
            images = self.jitter(images, rng, drawn)
        if s.random_erasing > 0:
            images = self.erase(images, rng, words, drawn)
        if s.mixing:
            images, labels = self.mix(images, labels, rng, drawn)
        self.last.append(drawn)
        if images.dim() == 4 and batch.images.is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(images, labels)

    def _host(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Host parameters to the device without waiting for the device's queue: a copy from
        pageable memory first syncs the stream, one from pinned memory does not (the pinned
        block returns to torch's host cache once the copy has run)."""
        t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # -- color jitter ------------------------------------------------------------------------
    def jitter(self, images: torch.Tensor, rng: np.random.Generator, drawn: dict) -> torch.Tensor:
        """torchvision's ColorJitter(s, s, s) per image: brightness, contrast and saturation
        factors from U[max(0, 1-s), 1+s], applied in a random order per image, each a blend
        clamped to [0, 1] (on 0-1 pixels: the normalisation is undone and redone)."""
        n, c = images.shape[:2]
        s = self.spec.color_jitter
        factors = rng.uniform(max(0.0, 1 - s), 1 + s, size=(n, 3))
        order = np.argsort(rng.random((n, 3)), axis=1)  # a random permutation per image
        drawn["jitter"] = (factors, order)
        mean, std = self._stats(c, images)
        x = images.float() * std + mean
        f = self._host(factors, torch.float32)
        o = self._host(order, torch.int64)
        shape = (n, 1, 1, 1)
        luma = self._const("luma", c, images)
        for r in range(3):
            op = o[:, r].view(shape)
            factor = f.gather(1, o[:, r : r + 1]).view(shape)
            gray = (x * luma).sum(1, keepdim=True) if c == 3 else x
            # brightness blends with black, contrast with the image's mean grey, saturation
            # with its grey image (a no-op on one channel, as torchvision)
            base = torch.where(
                op == 2, gray, torch.where(op == 1, gray.mean((1, 2, 3), keepdim=True), 0.0)
            )
            x = (x * factor + base * (1 - factor)).clamp_(0, 1)
        return ((x - mean) / std).to(images.dtype)

    def _stats(self, c: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._const("mean", c, images), self._const("std", c, images)

    def _const(self, name: str, c: int, images: torch.Tensor) -> torch.Tensor:
        key = (name, c, images.device)
        if key not in self._consts:
            values = {"mean": self.spec.mean, "std": self.spec.std, "luma": _LUMA}[name]
            values = tuple(values) * (c if len(values) == 1 else 1)
            self._consts[key] = torch.tensor(values[:c], device=images.device).view(1, c, 1, 1)
        return self._consts[key]

    # -- random erasing ----------------------------------------------------------------------
    def erase(
        self, images: torch.Tensor, rng: np.random.Generator, words: list[int], drawn: dict
    ) -> torch.Tensor:
        """timm's RandomErasing(mode="pixel") per image with probability p: a box of 2%-33% of
        the area, aspect ratio log-uniform in [0.3, 3.3] (10 tries to fit, else none), filled
        with normal noise per pixel and channel (the normalised pixels' own scale)."""
        n, _, h, w = images.shape
        hit = rng.random(n) < self.spec.random_erasing
        area = rng.uniform(0.02, 1 / 3, size=(n, 10)) * h * w
        ratio = np.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3), size=(n, 10)))
        eh = np.round(np.sqrt(area * ratio)).astype(np.int64)
        ew = np.round(np.sqrt(area / ratio)).astype(np.int64)
        fits = (eh < h) & (ew < w)
        first = fits.argmax(axis=1)
        rows = np.arange(n)
        eh, ew = eh[rows, first], ew[rows, first]
        hit &= fits.any(axis=1)
        top = (rng.random(n) * (h - eh + 1)).astype(np.int64)
        left = (rng.random(n) * (w - ew + 1)).astype(np.int64)
        eh, ew = np.where(hit, eh, 0), np.where(hit, ew, 0)
        drawn["erase"] = np.stack([top, left, eh, ew], axis=1)
        if not hit.any():
            return images
        # only the images hit: noise for them alone (a quarter of the batch at p 0.25)
        hit_rows = np.flatnonzero(hit)
        box = self._host(drawn["erase"][hit_rows], torch.int64)
        k = len(hit_rows)
        ys = torch.arange(h, device=images.device).view(1, h, 1)
        xs = torch.arange(w, device=images.device).view(1, 1, w)
        t, lf = box[:, 0].view(k, 1, 1), box[:, 1].view(k, 1, 1)
        inside = (ys >= t) & (ys < t + box[:, 2].view(k, 1, 1))
        inside = inside & (xs >= lf) & (xs < lf + box[:, 3].view(k, 1, 1))
        index = self._host(hit_rows, torch.int64)
        hit_images = images.index_select(0, index)
        gen = torch.Generator(device=images.device)
        gen.manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1))
        noise = torch.empty_like(hit_images).normal_(generator=gen)
        return images.index_copy(0, index, torch.where(inside.unsqueeze(1), noise, hit_images))

    # -- mixup / cutmix ----------------------------------------------------------------------
    def mix(
        self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, drawn: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup(mode="batch"): with probability mix_prob, mixup (lam ~ Beta(a, a)) or
        cutmix (a box of area 1 - lam, clipped to the image, lam corrected to the box kept),
        switching to cutmix with mix_switch_prob when both are on; the partner of sample i is
        sample n-1-i. Targets: lam * smooth(y) + (1 - lam) * smooth(y reversed)."""
        s = self.spec
        lam, box = 1.0, None
        if rng.random() < s.mix_prob:
            use_cutmix = s.cutmix_alpha > 0 and (
                s.mixup_alpha <= 0 or rng.random() < s.mix_switch_prob
            )
            alpha = s.cutmix_alpha if use_cutmix else s.mixup_alpha
            lam = float(rng.beta(alpha, alpha))
            if use_cutmix:
                box, lam = cutmix_box(images.shape[-2], images.shape[-1], lam, rng)
        drawn["mix"] = {"lam": lam, "box": box}
        partner = images.flip(0)
        if box is not None:
            y0, y1, x0, x1 = box
            images = images.clone()
            images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        elif lam < 1.0:
            images = images * lam + partner * (1.0 - lam)
        return images, self.targets(labels, lam)

    def targets(self, labels: torch.Tensor, lam: float) -> torch.Tensor:
        s = self.spec
        off = s.label_smoothing / s.num_classes
        one_hot = torch.full((len(labels), s.num_classes), off, device=labels.device)
        one_hot.scatter_(1, labels.view(-1, 1), 1.0 - s.label_smoothing + off)
        return one_hot * lam + one_hot.flip(0) * (1.0 - lam)


def cutmix_box(
    h: int, w: int, lam: float, rng: np.random.Generator
) -> tuple[tuple[int, int, int, int], float]:
    """timm's rand_bbox: a box with sides sqrt(1 - lam) of the image's, centred uniformly,
    clipped to the image; lam corrected to the area actually kept."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
    x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
    y0, y1, x0, x1 = int(y0), int(y1), int(x0), int(x1)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def spec_from_config(cfg) -> BatchAugmentSpec:
    d, t = cfg.data, cfg.train
    return BatchAugmentSpec(
        num_classes=cfg.model.num_classes,
        mean=tuple(d.mean),
        std=tuple(d.std),
        color_jitter=d.color_jitter,
        random_erasing=d.random_erasing,
        mixup_alpha=t.mixup_alpha,
        cutmix_alpha=t.cutmix_alpha,
        mix_prob=t.mix_prob,
        mix_switch_prob=t.mix_switch_prob,
        label_smoothing=t.label_smoothing,
    )
