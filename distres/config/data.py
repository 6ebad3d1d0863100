"""The data section: which shards, which backend, and how images become batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distres.config.base import ConfigError, _at_least, _choice, _in_range, doc

AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment_wide", "autoaugment")


@dataclass
class DataConfig:
    dataset: str = doc(
        "auto",
        "digits (built in, written to cache_dir once) | shards | auto (shards when "
        "train_shards or val_shards is set, else digits)",
    )
    train_shards: Any = doc(
        "",
        "train shards: a directory (with or without manifest.json), a manifest, one .tar, a "
        "brace pattern (train-{000000..001023}.tar), or a list of these (YAML list or '::'); "
        "each local, or a URL: s3://bucket/prefix, gs://, http(s)://, pipe:CMD "
        "(docs/remote-data.md)",
    )
    val_shards: Any = doc("", "validation shards, given as train_shards")
    verify_checksums: bool = doc(
        False, "check each shard against its manifest's sha256 when first read"
    )
    cache_dir: str = doc(
        "",
        "the node-local cache: remote shards (under shards/, one download per node) and "
        "built-in datasets; empty: $DISTRES_CACHE or ~/.cache/distres. Put it on a local disk",
    )
    cache_limit: Any = doc(
        0,
        "bytes of remote shards the cache keeps (least recently used evicted; local shards "
        "never count): an integer or a size such as 200GB or 1.5TiB; 0: no limit",
    )
    prefetch: int = doc(2, "remote shards each reader fetches ahead into the cache")
    retries: int = doc(
        5,
        "remote reads: attempts in a row without progress (5xx, reset, truncated body, "
        "stall) before the shard counts as bad (data.on_bad_sample)",
    )
    read_timeout: float = doc(60.0, "remote reads: seconds a connection or a socket read may stall")
    allow_shard_change: bool = doc(
        False,
        "resume on a shard set other than the checkpoint's (other shards or counts): the "
        "epoch restarts at its beginning on the new set; false: such a resume is refused",
    )
    backend: str = doc(
        "auto",
        "input pipeline: dali | torch (webdataset + torchvision v2) | "
        "auto (dali wherever it imports)",
    )
    decode: str = doc(
        "auto",
        "torch backend: where JPEGs are decoded and augmented. cpu: in the DataLoader "
        "workers | gpu: workers send bytes and crop boxes, the main process decodes whole "
        "batches with nvJPEG on the device (on a CPU device the same stage runs with "
        "libjpeg-turbo) | auto: gpu on a CUDA device that passes a start-up check, else cpu",
    )
    dali_threads: int = doc(
        0, "dali: CPU threads per pipeline; 0: the cores this rank's affinity mask allows"
    )
    on_bad_sample: str = doc(
        "error",
        "error: stop every rank with the shard and key | skip: "
        "report, count (data/skipped in metrics) and go on",
    )
    image_size: int = doc(32, "training crop size (pixels, square)")
    val_size: int = doc(
        0,
        "evaluation crop size (training's evaluation, distres.evaluate, distres.predict, "
        "final/inference.json); 0: image_size. FixRes (Touvron et al. 2019): a model trained "
        "on random-resized crops sees objects larger than a center crop shows them, so it "
        "evaluates best above its training size (torchvision's v2 recipe: train 176, "
        "evaluate 224 from 232; timm's RSB A3: train 160, evaluate 224)",
    )
    progressive_min_size: int = doc(
        0,
        "progressive resizing (FFCV): train at this size first, growing to image_size over "
        "progressive_epochs; 0: off",
    )
    progressive_epochs: list[int] = doc(
        [0, 0], "progressive resizing: [first, last] epoch of the linear ramp"
    )
    progressive_step: int = doc(
        32, "progressive resizing: sizes are multiples of this (few shapes for cuDNN/compile)"
    )
    val_resize: int = doc(
        0,
        "val: resize the shorter side to this, then center-crop val_size; 0: no resize, "
        "the center crop alone (digits' images are image_size already; ImageNet presets "
        "set 256 for 224, the 0.875 crop)",
    )
    random_resized_crop: bool = doc(False, "train: RandomResizedCrop (ImageNet recipe)")
    rrc_min_scale: float = doc(0.08, "train: smallest area fraction RandomResizedCrop takes")
    crop_padding: int = doc(
        2,
        "train: random crop after padding by this many pixels (0: off; "
        "ignored with random_resized_crop)",
    )
    hflip: bool = doc(False, "train: random horizontal flip (off for digits: a 2 is not a 5)")
    auto_augment: str = doc(
        "none",
        "train: none | randaugment (Cubuk et al. 2020; timm's RSB recipes) | "
        "trivialaugment_wide (Mueller & Hutter 2021; torchvision's v2 recipe) | autoaugment "
        "(the ImageNet policy, Cubuk et al. 2019). The same operators, magnitudes and fill "
        "(128) in both backends: torchvision v2 (torch) and DALI's auto_aug (dali); after the "
        "crop and flip, per image",
    )
    ra_magnitude: int = doc(
        9,
        "randaugment: magnitude bin out of 31 (torchvision's scale, 0-30; torchvision's "
        "default 9; timm's m<N> of 10 is about 3N here, e.g. RSB A3's m6 -> 18)",
    )
    ra_num_ops: int = doc(2, "randaugment: operators applied per image")
    color_jitter: float = doc(
        0.0,
        "train: brightness, contrast and saturation jitter of this strength in a random order "
        "per image (torchvision's ColorJitter(s, s, s); timm's color_jitter); on the device "
        "after the loader, the same for every backend; 0: off",
    )
    aug_repeats: int = doc(
        1,
        "train: repeated augmentation (Hoffer et al. 2020; torchvision's --ra-reps 4 in its "
        "v2 recipe, DeiT's 3): each epoch takes 1/N of the training set and gives each sample "
        "to N different ranks, each augmenting it its own way; the epoch keeps its length. "
        "DALI: per sample; torch backend: per shard. 1: off",
    )
    random_erasing: float = doc(
        0.0,
        "train: probability of erasing a random box (0.02-0.33 of the area, aspect 0.3-3.3) "
        "with per-pixel normal noise (timm's re_prob, mode pixel; torchvision's v2 recipe: "
        "0.1); on the device after the loader, the same for every backend; 0: off",
    )
    mean: list[float] = doc([0.485, 0.456, 0.406], "per-channel mean for normalisation (0-1)")
    std: list[float] = doc([0.229, 0.224, 0.225], "per-channel std for normalisation (0-1)")
    shuffle_buffer: int = doc(
        2048, "train, DALI: samples in each rank's shuffle buffer (at most 1024 are used)"
    )
    streams: int = doc(
        0,
        "train, torch backend: the canonical streams each epoch's sample order is cut into "
        "(docs/data.md): the order is a function of (seed, epoch, streams), never of the world "
        "size, and a run resumes exactly on any world size that divides it. 0: at a run's "
        "first start, lcm(world x workers, 24) (fewer for small data), kept by its checkpoints",
    )
    stream_window: int = doc(
        256,
        "train, torch backend: consecutive samples each stream reads and hands out in a "
        "random order (the shuffle; a worker holds this many per stream it reads)",
    )
    num_workers: int = doc(
        0, "DataLoader worker processes per rank (0: decode in the main process)"
    )

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, ("auto", "digits", "shards"))
        for key in ("train_shards", "val_shards"):
            setattr(self, key, _shard_spec(f"data.{key}", getattr(self, key)))
        if self.dataset == "digits" and (self.train_shards or self.val_shards):
            key = "train_shards" if self.train_shards else "val_shards"
            raise ConfigError(
                f"data.{key}={getattr(self, key)!r} has no effect with data.dataset=digits; "
                "set data.dataset=shards (or auto), or drop the shard setting"
            )
        _choice("data.backend", self.backend, ("auto", "dali", "torch"))
        _choice("data.decode", self.decode, ("auto", "cpu", "gpu"))
        if self.backend == "dali" and self.decode != "auto":
            raise ConfigError(
                f"data.decode={self.decode} is the torch backend's setting; DALI decodes on "
                "the GPU wherever it runs on one (drop data.decode or use data.backend=torch)"
            )
        _at_least("data.dali_threads", self.dali_threads, 0)
        self.cache_limit = parse_size("data.cache_limit", self.cache_limit)
        _at_least("data.prefetch", self.prefetch, 0)
        _at_least("data.retries", self.retries, 1)
        _in_range("data.read_timeout", self.read_timeout, 0.1, 3600.0)
        _choice("data.on_bad_sample", self.on_bad_sample, ("error", "skip"))
        _at_least("data.image_size", self.image_size, 8)
        _at_least("data.val_resize", self.val_resize, 0)
        if self.val_size:
            _at_least("data.val_size", self.val_size, 8)
        if self.val_resize and self.val_resize < self.eval_size:
            which = "val_size" if self.val_size else "image_size"
            raise ConfigError(
                f"data.val_resize={self.val_resize}: must be 0 or >= data.{which}="
                f"{self.eval_size} (the center crop is taken from the resized image)"
            )
        _in_range("data.rrc_min_scale", self.rrc_min_scale, 0.01, 1.0)
        _choice("data.auto_augment", self.auto_augment, AUTO_AUGMENTS)
        _in_range("data.ra_magnitude", self.ra_magnitude, 0, 30)
        _in_range("data.ra_num_ops", self.ra_num_ops, 1, 14)
        _in_range("data.color_jitter", self.color_jitter, 0.0, 1.0)
        _in_range("data.random_erasing", self.random_erasing, 0.0, 1.0)
        _in_range("data.aug_repeats", self.aug_repeats, 1, 16)
        _at_least("data.crop_padding", self.crop_padding, 0)
        _at_least("data.shuffle_buffer", self.shuffle_buffer, 1)
        _at_least("data.streams", self.streams, 0)
        _at_least("data.stream_window", self.stream_window, 1)
        _at_least("data.num_workers", self.num_workers, 0)
        if self.progressive_min_size:
            _in_range("data.progressive_min_size", self.progressive_min_size, 8, self.image_size)
            _at_least("data.progressive_step", self.progressive_step, 1)
            ramp = self.progressive_epochs
            if len(ramp) != 2 or not 0 <= ramp[0] < ramp[1]:
                raise ConfigError(
                    f"data.progressive_epochs={list(ramp)}: expected [first, last] with "
                    "0 <= first < last"
                )
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, 3):
                raise ConfigError(f"data.{key}={getattr(self, key)}: needs 1 or 3 values")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std={self.std}: every value must be > 0")
        if self.source == "shards":
            for key in ("train_shards", "val_shards"):
                if not getattr(self, key):
                    raise ConfigError(f"data.{key} is empty: data.dataset=shards needs a path")

    @property
    def eval_size(self) -> int:
        """The evaluation crop: val_size, or image_size when it is 0."""
        return self.val_size or self.image_size

    @property
    def source(self) -> str:
        """The dataset in effect: shards when asked for, or (auto) when a shard path is set."""
        if self.dataset != "auto":
            return self.dataset
        return "shards" if self.train_shards or self.val_shards else "digits"

    def train_size(self, epoch: int) -> int:
        """The training crop size in `epoch` (0-based): progressive_min_size up to
        progressive_epochs[0], a linear ramp to image_size at progressive_epochs[1], rounded to
        a multiple of progressive_step (FFCV's schedule)."""
        if not self.progressive_min_size:
            return self.image_size
        lo, hi = self.progressive_min_size, self.image_size
        first, last = self.progressive_epochs
        t = min(1.0, max(0.0, (epoch - first) / (last - first)))
        size = round((lo + t * (hi - lo)) / self.progressive_step) * self.progressive_step
        return min(hi, max(lo, size))


def _shard_spec(key: str, value: Any) -> str | list[str]:
    """A shard setting as given: one string (maybe '::'-joined) or a list of strings."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ConfigError(f"{key}={value!r}: expected a path, a pattern or a list of them")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(key: str, value: Any) -> int:
    """Bytes from an integer or a size with a unit (200GB, 1.5TiB, 512MiB)."""
    import re

    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(value), re.IGNORECASE)
    if isinstance(value, bool) or m is None:
        raise ConfigError(f"{key}={value!r}: expected bytes, or a size such as 200GB or 1.5TiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def shard_specs(value: str | list[str]) -> list[str]:
    """The shard sources of a setting: a list, or one string split at webdataset's '::'."""
    items = value if isinstance(value, list) else str(value).split("::")
    return [v.strip() for v in items if v.strip()]
