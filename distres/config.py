"""The run configuration: a tree of dataclasses, YAML presets, `key=value` overrides.

    python -m distres.train [--config configs/NAME.yaml] [section.key=value ...]

The dataclass defaults are the embedded default run (CIFAR-style ResNet-20 on the built-in
`digits` shards, CPU). Every check runs here, before any process group exists, and fails with a
`ConfigError` whose one-line message names the field and the value.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distres.models.archs import ARCHS


class ConfigError(ValueError):
    """A user error in the configuration; main() prints it as one line and exits with code 2."""


def doc(default: Any, help: str) -> Any:
    """A field with a one-line doc that `--help` prints (lists/dicts get a factory)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, choices))}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value!r}: must be >= {low}")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}={value!r}: must be in [{low}, {high}]")


@dataclass
class RunConfig:
    name: str = doc("digits-resnet20", "run name; the default run.dir is runs/<name>-<timestamp>")
    dir: str = doc("", "output directory; empty means runs/<name>-<timestamp>")
    seed: int = doc(0, "base random seed (each rank offsets it by its rank)")
    device: str = doc("auto", "auto | cpu | cuda; auto takes cuda when a GPU is visible")
    deterministic: bool = doc(False, "deterministic kernels (slower; for exact reproduction)")
    threads: int = doc(0, "intra-op CPU threads per process; 0 leaves torch's default")

    def __post_init__(self) -> None:
        _choice("run.device", self.device, ("auto", "cpu", "cuda"))
        _at_least("run.threads", self.threads, 0)
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name={self.name!r}: must be non-empty and contain no '/'")


@dataclass
class ModelConfig:
    name: str = doc("resnet20", f"architecture: {', '.join(ARCHS)}")
    num_classes: int = doc(10, "number of output classes")
    in_chans: int = doc(3, "input image channels")
    plain: bool = doc(False, "remove every shortcut (a plain net, for the degradation study)")
    zero_init_residual: bool = doc(False, "zero-init the last BN of each residual branch")

    def __post_init__(self) -> None:
        _choice("model.name", self.name, tuple(ARCHS))
        _at_least("model.num_classes", self.num_classes, 2)
        _at_least("model.in_chans", self.in_chans, 1)
        if self.plain and self.zero_init_residual:
            raise ConfigError(
                "model.zero_init_residual=True with model.plain=True would zero every block's "
                "output (there is no shortcut to carry the signal); set one of them to false"
            )


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
        "brace pattern (train-{000000..001023}.tar), or a list of these (YAML list or '::')",
    )
    val_shards: Any = doc("", "validation shards, given as train_shards")
    verify_checksums: bool = doc(
        False, "check each shard against its manifest's sha256 when first read"
    )
    cache_dir: str = doc(
        "", "where built-in datasets are written; empty: $DISTRES_CACHE or ~/.cache/distres"
    )
    backend: str = doc(
        "auto",
        "input pipeline: dali | torch (webdataset + torchvision v2) | "
        "auto (dali wherever it imports)",
    )
    dali_threads: int = doc(0, "dali: CPU threads per pipeline; 0: torch's thread count")
    on_bad_sample: str = doc(
        "error",
        "error: stop every rank with the shard and key | skip: "
        "report, count (data/skipped in metrics) and go on",
    )
    image_size: int = doc(32, "training crop size (pixels, square); also the val crop")
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
        "val: resize the shorter side to this, then center-crop "
        "image_size; 0 means round(image_size * 8/7), or none for digits",
    )
    random_resized_crop: bool = doc(False, "train: RandomResizedCrop (ImageNet recipe)")
    rrc_min_scale: float = doc(0.08, "train: smallest area fraction RandomResizedCrop takes")
    crop_padding: int = doc(
        2,
        "train: random crop after padding by this many pixels (0: off; "
        "ignored with random_resized_crop)",
    )
    hflip: bool = doc(False, "train: random horizontal flip (off for digits: a 2 is not a 5)")
    mean: list[float] = doc([0.485, 0.456, 0.406], "per-channel mean for normalisation (0-1)")
    std: list[float] = doc([0.229, 0.224, 0.225], "per-channel std for normalisation (0-1)")
    shuffle_buffer: int = doc(2048, "train: samples in the in-memory shuffle buffer")
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
        _at_least("data.dali_threads", self.dali_threads, 0)
        _choice("data.on_bad_sample", self.on_bad_sample, ("error", "skip"))
        if self.backend == "dali":
            from distres.data.dali import dali_available

            if not dali_available():
                raise ConfigError(
                    "data.backend=dali but nvidia.dali does not import (pip "
                    "install nvidia-dali-cuda130, or set data.backend=torch)"
                )
        _at_least("data.image_size", self.image_size, 8)
        _at_least("data.val_resize", self.val_resize, 0)
        if self.val_resize and self.val_resize < self.image_size:
            raise ConfigError(
                f"data.val_resize={self.val_resize}: must be 0 or >= data.image_size="
                f"{self.image_size} (the center crop is taken from the resized image)"
            )
        _in_range("data.rrc_min_scale", self.rrc_min_scale, 0.01, 1.0)
        _at_least("data.crop_padding", self.crop_padding, 0)
        _at_least("data.shuffle_buffer", self.shuffle_buffer, 1)
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
                value = getattr(self, key)
                if not value:
                    raise ConfigError(f"data.{key} is empty: data.dataset=shards needs a path")
                for spec in shard_specs(value):
                    if not _shard_source_exists(spec):
                        raise ConfigError(
                            f"data.{key}={spec!r}: no such shard directory, manifest or tar"
                        )

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


def shard_specs(value: str | list[str]) -> list[str]:
    """The shard sources of a setting: a list, or one string split at webdataset's '::'."""
    items = value if isinstance(value, list) else str(value).split("::")
    return [v.strip() for v in items if v.strip()]


def _shard_source_exists(spec: str) -> bool:
    """A directory, a file (tar or manifest), or a brace pattern whose first expansion exists."""
    import braceexpand

    first = next(iter(braceexpand.braceexpand(spec)), spec)
    return Path(spec).is_dir() or Path(first).is_file() or "://" in spec


@dataclass
class OptimConfig:
    name: str = doc(
        "sgd",
        "sgd (momentum / Nesterov) | adamw | lars (SGD with layer-wise trust ratios) | lamb; "
        "lars/lamb are timm's, for global batches over ~4k",
    )
    lr: float = doc(0.1, "peak learning rate (after warm-up); per 256 samples if lr_scaling=linear")
    lr_scaling: str = doc(
        "none",
        "none | linear: lr is per 256 samples, scaled to the global batch (Goyal et al. 2017)",
    )
    momentum: float = doc(0.9, "sgd/lars momentum; adamw/lamb beta1")
    nesterov: bool = doc(True, "sgd/lars: Nesterov momentum")
    beta2: float = doc(0.999, "adamw/lamb beta2")
    weight_decay: float = doc(5e-4, "decoupled for adamw/lamb, L2 for sgd/lars")
    trust_coeff: float = doc(
        0.001, "lars: trust coefficient (eta); a layer's lr is lr * eta * |w| / |g + wd w|"
    )
    no_wd_bn_bias: bool = doc(True, "exclude BN and bias parameters from weight decay")
    schedule: str = doc("cosine", "cosine | poly | step | constant, after the warm-up")
    warmup_epochs: float = doc(2.0, "linear warm-up from warmup_start_factor*lr, in epochs")
    warmup_start_factor: float = doc(0.1, "warm-up starts at this fraction of lr")
    min_lr_factor: float = doc(0.0, "cosine/poly: final lr as a fraction of lr")
    poly_power: float = doc(2.0, "poly: lr falls as (1 - progress) ** power (MLPerf's LARS)")
    step_milestones: list[float] = doc(
        [0.5, 0.75], "step: epochs at which lr drops; values below 1 are fractions of train.epochs"
    )
    step_gamma: float = doc(0.1, "step: lr multiplier at each milestone")

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("sgd", "adamw", "lars", "lamb"))
        _choice("optim.lr_scaling", self.lr_scaling, ("none", "linear"))
        _choice("optim.schedule", self.schedule, ("cosine", "poly", "step", "constant"))
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr}: must be > 0")
        _in_range("optim.momentum", self.momentum, 0.0, 0.9999)
        _in_range("optim.beta2", self.beta2, 0.0, 0.99999)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        _at_least("optim.warmup_epochs", self.warmup_epochs, 0.0)
        _in_range("optim.warmup_start_factor", self.warmup_start_factor, 0.0, 1.0)
        _in_range("optim.min_lr_factor", self.min_lr_factor, 0.0, 1.0)
        _in_range("optim.step_gamma", self.step_gamma, 0.0, 1.0)
        _in_range("optim.trust_coeff", self.trust_coeff, 1e-6, 1.0)
        if not self.poly_power > 0:
            raise ConfigError(f"optim.poly_power={self.poly_power}: must be > 0")


@dataclass
class TrainConfig:
    epochs: int = doc(15, "passes over the training set")
    batch_size: int = doc(64, "micro-batch per rank")
    grad_accum: int = doc(1, "micro-batches per optimizer step (ignored if global_batch is set)")
    global_batch: int = doc(
        0,
        "samples per optimizer step over all ranks; 0: batch_size x "
        "grad_accum x world size, else grad_accum is derived from it",
    )
    label_smoothing: float = doc(0.0, "cross-entropy label smoothing")
    precision: str = doc("auto", "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    channels_last: bool = doc(True, "model and inputs in channels_last memory format")
    clip_grad_norm: float = doc(0.0, "clip the global grad norm to this; 0: off")
    max_steps: int = doc(0, "stop after this many optimizer steps; 0: run all epochs")
    eval_every_epochs: int = doc(1, "evaluate on the val set every N epochs (and at the end)")
    stop_check_every: int = doc(
        1,
        "optimizer steps between stop-consensus all-reduces (signal, "
        "non-finite loss); each is one host sync",
    )

    def __post_init__(self) -> None:
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.grad_accum", self.grad_accum, 1)
        _at_least("train.global_batch", self.global_batch, 0)
        _at_least("train.stop_check_every", self.stop_check_every, 1)
        _in_range("train.label_smoothing", self.label_smoothing, 0.0, 0.99)
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _at_least("train.clip_grad_norm", self.clip_grad_norm, 0.0)
        _at_least("train.max_steps", self.max_steps, 0)
        _at_least("train.eval_every_epochs", self.eval_every_epochs, 1)


@dataclass
class EngineConfig:
    name: str = doc("ddp", "ddp (DistributedDataParallel; plain on one process) | deepspeed")
    compile: bool = doc(False, "torch.compile the model")
    sync_bn: bool = doc(False, "SyncBatchNorm across ranks (GPU only; for small per-GPU batches)")
    bucket_cap_mb: int = doc(
        25,
        "DDP gradient bucket size in MiB (25: ResNet-50's 102 MB of gradients in ~5 buckets, "
        "the last one's all-reduce exposed after backward; docs/performance.md)",
    )
    static_graph: bool = doc(
        True,
        "DDP static_graph: the same parameters take part in every step (true of every ResNet "
        "here), so DDP skips its per-step search for unused parameters; off under grad_accum",
    )
    zero_stage: int = doc(1, "deepspeed: ZeRO stage 0 | 1 | 2 | 3")
    deepspeed_config: str = doc(
        "",
        "deepspeed: a JSON (e.g. configs/deepspeed/zero2_offload.json) adding settings only "
        "DeepSpeed has; a value that contradicts this config is an error",
    )
    activation_checkpointing: str = doc(
        "off",
        "recompute activations in backward: off | stage (one group per residual stage) "
        "| N (groups of N blocks)",
    )

    def __post_init__(self) -> None:
        _choice("engine.name", self.name, ("ddp", "deepspeed"))
        _at_least("engine.bucket_cap_mb", self.bucket_cap_mb, 1)
        _choice("engine.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _ = self.checkpoint_group  # raises on a bad value
        if self.deepspeed_config and not Path(self.deepspeed_config).is_file():
            raise ConfigError(f"engine.deepspeed_config={self.deepspeed_config}: no such file")
        if self.name == "deepspeed" and self.compile:
            raise ConfigError("engine.compile=true with engine.name=deepspeed: use the ddp engine")
        if self.name == "deepspeed" and self.sync_bn:
            raise ConfigError("engine.sync_bn=true with engine.name=deepspeed: use the ddp engine")
        if self.compile and self.sync_bn:
            # NOTE: upstream reports of torch.compile over SyncBatchNorm failing or running
            # eager; refused until a GPU run of distres checks the pair.
            raise ConfigError(
                "engine.compile=true with engine.sync_bn=true: not checked on GPUs yet "
                "(upstream failure reports); set one of them to false"
            )

    @property
    def checkpoint_group(self) -> int | None:
        """None: off; 0: one group per stage; N: groups of N blocks."""
        value = str(self.activation_checkpointing)
        if value == "off":
            return None
        if value == "stage":
            return 0
        if value.isdigit() and int(value) > 0:
            return int(value)
        raise ConfigError(
            f"engine.activation_checkpointing={value}: use off, stage or a block count >= 1"
        )


@dataclass
class CheckpointConfig:
    dir: str = doc("", "where checkpoints go; empty means <run.dir>/checkpoints")
    every_steps: int = doc(0, "checkpoint every N optimizer steps; 0: off")
    every_epochs: int = doc(1, "checkpoint at the end of every N epochs; 0: off")
    on_stop: bool = doc(True, "checkpoint when the run stops: completed, early stop, signal")
    keep_last: int = doc(2, "committed checkpoints kept, newest first (plus the best one)")
    keep_best: bool = doc(True, "also keep the best checkpoint by early_stop.monitor")
    async_save: bool = doc(False, "write in the background; training goes on meanwhile")
    resume: str = doc("auto", "auto (latest complete one in the dir, if any) | none | PATH")
    save_final: bool = doc(True, "write final/model.safetensors and final/model.yaml")
    trust: bool = doc(
        False,
        "engine.name=deepspeed: load DeepSpeed's checkpoint files with its full unpickler "
        "(only for checkpoints you wrote); false reads them with weights_only=True",
    )

    def __post_init__(self) -> None:
        _at_least("checkpoint.every_steps", self.every_steps, 0)
        _at_least("checkpoint.every_epochs", self.every_epochs, 0)
        _at_least("checkpoint.keep_last", self.keep_last, 1)
        if not self.resume:
            raise ConfigError("checkpoint.resume='': use auto, none or a checkpoint path")

    @property
    def enabled(self) -> bool:
        return bool(self.every_steps or self.every_epochs or self.on_stop)


@dataclass
class EarlyStopConfig:
    patience: int = doc(0, "evaluations without improvement before stopping; 0: off")
    monitor: str = doc("val/top1", "val/top1 | val/top5 | val/loss")
    mode: str = doc("auto", "auto (max for accuracies, min for loss) | max | min")
    min_delta: float = doc(0.0, "an improvement must exceed this")

    def __post_init__(self) -> None:
        _at_least("early_stop.patience", self.patience, 0)
        _choice("early_stop.monitor", self.monitor, ("val/top1", "val/top5", "val/loss"))
        _choice("early_stop.mode", self.mode, ("auto", "max", "min"))
        _at_least("early_stop.min_delta", self.min_delta, 0.0)

    @property
    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.monitor.endswith("loss") else "max"


@dataclass
class TrackingConfig:
    progress: str = doc("auto", "auto (a bar on a TTY, log lines otherwise) | bar | log | off")
    log_every: int = doc(20, "optimizer steps between train log records and log lines")
    wandb: str = doc(
        "auto",
        "auto (online when an API key is configured, offline otherwise) | online | "
        "offline | off; rank 0 only, files under <run.dir>/wandb",
    )
    wandb_project: str = doc("distres", "W&B project")
    wandb_entity: str = doc("", "W&B entity (team or user); empty: the key's default")
    plots: bool = doc(True, "draw plots/curves.png (loss, lr, top-1 against step) at the end")

    def __post_init__(self) -> None:
        # NOTE: YAML 1.1 (OmegaConf's parser) reads a bare `off` as false, which a str field
        # then holds as "False"; take it back to the word the user wrote.
        if self.progress == "False":
            self.progress = "off"
        if self.wandb == "False":
            self.wandb = "off"
        _choice("tracking.progress", self.progress, ("auto", "bar", "log", "off"))
        _choice("tracking.wandb", self.wandb, ("auto", "online", "offline", "off"))
        _at_least("tracking.log_every", self.log_every, 1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        arch = ARCHS[self.model.name]
        size = self.data.image_size
        if arch.stem == "imagenet" and size < 64:
            raise ConfigError(
                f"data.image_size={size} with model.name={self.model.name}: ImageNet-stem "
                "models downsample 32x and need >= 64 px; use a CIFAR-style model (resnet20..."
                "resnet1202, preact_resnet164/1001) for small images"
            )
        if arch.stem == "cifar" and size > 64:
            raise ConfigError(
                f"data.image_size={size} with model.name={self.model.name}: CIFAR-style models "
                "keep full resolution in stage 1 and are meant for <= 64 px; use resnet18..152"
            )
        if self.data.source == "digits" and self.model.num_classes != 10:
            raise ConfigError(
                f"model.num_classes={self.model.num_classes} with data.dataset=digits: digits "
                "has 10 classes"
            )
        if len(self.data.mean) not in (1, self.model.in_chans) or len(self.data.std) not in (
            1,
            self.model.in_chans,
        ):
            raise ConfigError(
                f"data.mean/std have {len(self.data.mean)}/{len(self.data.std)} values for "
                f"model.in_chans={self.model.in_chans}: give 1 or {self.model.in_chans}"
            )


# Keys that only matter under another choice: (key, whether it matters, the choice it needs).
# A value the user states (an override, or the --config file itself; not a base preset, whose
# settings a variant may leave behind) where it has no effect is refused, so nothing a user
# sets is dropped without a word. Backend-specific keys are not here: a preset serves both
# backends, and data.backend=auto picks one per machine.
_DEPENDENT_KEYS: tuple[tuple[str, Callable[[Config], bool], str], ...] = (
    (
        "data.progressive_epochs",
        lambda c: c.data.progressive_min_size > 0,
        "data.progressive_min_size > 0",
    ),
    (
        "data.progressive_step",
        lambda c: c.data.progressive_min_size > 0,
        "data.progressive_min_size > 0",
    ),
    ("data.rrc_min_scale", lambda c: c.data.random_resized_crop, "data.random_resized_crop=true"),
    (
        "data.crop_padding",
        lambda c: not c.data.random_resized_crop,
        "data.random_resized_crop=false",
    ),
    ("optim.beta2", lambda c: c.optim.name in ("adamw", "lamb"), "optim.name=adamw or lamb"),
    ("optim.trust_coeff", lambda c: c.optim.name == "lars", "optim.name=lars"),
    ("optim.nesterov", lambda c: c.optim.name in ("sgd", "lars"), "optim.name=sgd or lars"),
    ("optim.poly_power", lambda c: c.optim.schedule == "poly", "optim.schedule=poly"),
    ("optim.step_milestones", lambda c: c.optim.schedule == "step", "optim.schedule=step"),
    ("optim.step_gamma", lambda c: c.optim.schedule == "step", "optim.schedule=step"),
    (
        "optim.min_lr_factor",
        lambda c: c.optim.schedule in ("cosine", "poly"),
        "optim.schedule=cosine or poly",
    ),
    ("optim.warmup_start_factor", lambda c: c.optim.warmup_epochs > 0, "optim.warmup_epochs > 0"),
    (
        "train.grad_accum",
        lambda c: not c.train.global_batch,
        "train.global_batch=0 (a global batch derives the accumulation)",
    ),
    ("engine.zero_stage", lambda c: c.engine.name == "deepspeed", "engine.name=deepspeed"),
    ("engine.deepspeed_config", lambda c: c.engine.name == "deepspeed", "engine.name=deepspeed"),
    ("checkpoint.trust", lambda c: c.engine.name == "deepspeed", "engine.name=deepspeed"),
    ("engine.bucket_cap_mb", lambda c: c.engine.name == "ddp", "engine.name=ddp"),
    ("engine.static_graph", lambda c: c.engine.name == "ddp", "engine.name=ddp"),
    ("early_stop.min_delta", lambda c: c.early_stop.patience > 0, "early_stop.patience > 0"),
    ("tracking.wandb_project", lambda c: c.tracking.wandb != "off", "tracking.wandb != off"),
    ("tracking.wandb_entity", lambda c: c.tracking.wandb != "off", "tracking.wandb != off"),
)


def _default(section: str, key: str) -> Any:
    cls = {f.name: f.default_factory for f in dataclasses.fields(Config)}[section]
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _refuse_settings_without_effect(cfg: Config, stated: set[str]) -> None:
    for key, matters, needs in _DEPENDENT_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key in stated and value != _default(section, name) and not matters(cfg):
            raise ConfigError(
                f"{key}={value!r} has no effect here: it needs {needs}; remove it or change "
                "that setting"
            )


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits: micro_batch x grad_accum x world_size."""

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def plan_batch(cfg: Config, world_size: int) -> BatchPlan:
    """Resolve gradient accumulation for this world size (checked before any group exists)."""
    micro = cfg.train.batch_size
    if not cfg.train.global_batch:
        return BatchPlan(micro, cfg.train.grad_accum, world_size)
    per_step = micro * world_size
    if cfg.train.global_batch % per_step:
        fits = [d * per_step for d in range(1, 9)]
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} is not a multiple of train.batch_size="
            f"{micro} x {world_size} ranks = {per_step}; use one of {fits[:4]}..., or a "
            "batch_size that divides global_batch / world size"
        )
    return BatchPlan(micro, cfg.train.global_batch // per_step, world_size)


def _one_line(err: OmegaConfBaseException) -> str:
    """OmegaConf's messages span several lines; keep what names the key and the problem."""
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0].strip()
    if "not in" in msg and key:
        section = key.rsplit(".", 1)[0] if "." in key else None
        known = _known_keys(section)
        return f"{key}: unknown key" + (f" (known: {', '.join(known)})" if known else "")
    if key and not msg.startswith(key):
        return f"{key}: {msg}"
    return msg


def _known_keys(section: str | None) -> list[str]:
    if section is None:
        return [f.name for f in dataclasses.fields(Config)]
    sub = {f.name: f.type for f in dataclasses.fields(Config)}.get(section)
    cls = globals().get(sub) if isinstance(sub, str) else sub
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML preset <- `section.key=value` overrides, then every check."""
    schema = OmegaConf.structured(Config)
    layers = _preset_layers(Path(path)) if path is not None else []
    top = layers[-1][1] if layers else {}  # the --config file itself, not its bases
    stated = {
        f"{section}.{key}"
        for section, keys in top.items()
        if isinstance(keys, dict | DictConfig)
        for key in keys
    }
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        if "." not in key:
            raise ConfigError(
                f"override {item!r}: expected section.key=value (e.g. train.epochs=5)"
            )
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([f"{key}={value}"])))
    stated |= {item.split("=", 1)[0] for item in overrides}
    merged = schema
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{_one_line(e)} (from {source})") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(_one_line(e)) from None
    _refuse_settings_without_effect(cfg, stated)
    return cfg


def _preset_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, Any]]:
    """A preset and, first, the presets it builds on: a top-level `base: other.yaml` (relative
    to the file) is loaded underneath it, so a variant states only what it changes."""
    if not path.is_file():
        where = f"{seen[-1]}: base" if seen else "--config"
        raise ConfigError(f"{where} {path}: no such file")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base presets form a cycle ({' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw or {})
    base = raw.pop("base", None)
    layers = []
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a file name, got {base!r}")
        layers = _preset_layers(path.parent / base, (*seen, path.resolve()))
    return [*layers, (str(path), OmegaConf.create(raw))]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(to_yaml(cfg))


def help_text() -> str:
    """Every key with its default and one-line doc, section by section."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            setting = f"{section.name}.{f.name}={default}"
            lines.append(f"  {setting:<34} {f.metadata.get('help', '')}")
    return "\n".join(lines)


__all__ = [
    "BatchPlan",
    "Config",
    "ConfigError",
    "help_text",
    "load_config",
    "plan_batch",
    "save_config",
]
