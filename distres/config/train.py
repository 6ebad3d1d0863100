"""The train section: epochs and batches, the loss and batch mixing, the EMA of the weights,
precision and the loop's cadences."""

from __future__ import annotations

from dataclasses import dataclass

from distres.config.base import ConfigError, _at_least, _choice, _in_range, doc


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
    elastic_batch: str = doc(
        "exact",
        "when micro-batch x accumulation x world size cannot equal the global batch (global_batch "
        "set, or a checkpoint's resumed on another world size): exact refuses in one line naming "
        "the world sizes that work | nearest takes the nearest global batch it can (the LR "
        "follows it under optim.lr_scaling=linear), logged",
    )
    label_smoothing: float = doc(
        0.0, "label smoothing (cross-entropy; with mixing or bce, folded into the targets)"
    )
    loss: str = doc(
        "ce",
        "ce (softmax cross-entropy) | bce (binary cross-entropy per class on the one-hot or "
        "mixed targets: timm's RSB recipes)",
    )
    bce_threshold: float = doc(
        0.2,
        "bce: targets above this become 1, the rest 0 (RSB's target threshold: a mixed "
        "image counts fully for both classes); 0: keep soft targets",
    )
    mixup_alpha: float = doc(
        0.0, "mixup: lam ~ Beta(alpha, alpha) (torchvision v2 recipe 0.2, RSB A3 0.1); 0: off"
    )
    cutmix_alpha: float = doc(
        0.0, "cutmix: lam ~ Beta(alpha, alpha) (torchvision v2 recipe and RSB A3: 1.0); 0: off"
    )
    mix_prob: float = doc(1.0, "probability that a batch is mixed (mixup or cutmix)")
    mix_switch_prob: float = doc(
        0.5, "with both mixup and cutmix on: probability of cutmix for a mixed batch"
    )
    ema_decay: float = doc(
        0.0,
        "an exponential moving average of the weights (timm's ModelEmaV3, torchvision's "
        "--model-ema): its decay per ema_batch samples seen, so its horizon in samples holds on "
        "any world size and global batch (a step of B samples decays by "
        "ema_decay ** (B / ema_batch)); reported as val_ema/*; 0: off",
    )
    ema_batch: int = doc(
        256,
        "the samples ema_decay is stated per (set it to a recipe's global batch to take its "
        "per-step decay as it is)",
    )
    ema_every: int = doc(
        1,
        "update the EMA every N optimizer steps, with the decay of the N steps' samples "
        "(torchvision's --model-ema-steps 32)",
    )
    ema_warmup: bool = doc(
        False,
        "timm's EMA warm-up: the decay is at most 1 - (1 + t) ** -2/3, t in ema_batch units of "
        "samples seen, so early weights fade fast",
    )
    precision: str = doc("auto", "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    tf32: bool = doc(True, "TF32 for fp32 matmuls and convolutions on a GPU (false: full fp32)")
    channels_last: bool = doc(True, "model and inputs in channels_last memory format")
    clip_grad_norm: float = doc(0.0, "clip the global grad norm to this; 0: off")
    max_steps: int = doc(0, "stop after this many optimizer steps; 0: run all epochs")
    eval_every_epochs: int = doc(1, "evaluate on the val set every N epochs (and at the end)")
    stop_check_every: int = doc(
        0,
        "optimizer steps between stop-consensus all-reduces (signal, non-finite loss, early "
        "stop); each is one host sync. 0: every step on a CPU, every 25 on a GPU (a stop "
        "then waits at most 25 steps; epoch ends and the last step always check)",
    )

    def __post_init__(self) -> None:
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.grad_accum", self.grad_accum, 1)
        _at_least("train.global_batch", self.global_batch, 0)
        _at_least("train.stop_check_every", self.stop_check_every, 0)
        _choice("train.elastic_batch", self.elastic_batch, ("exact", "nearest"))
        _in_range("train.label_smoothing", self.label_smoothing, 0.0, 0.99)
        _choice("train.loss", self.loss, ("ce", "bce"))
        _in_range("train.bce_threshold", self.bce_threshold, 0.0, 0.99)
        for key in ("mixup_alpha", "cutmix_alpha"):
            if not 0.0 <= getattr(self, key) <= 100.0:
                raise ConfigError(f"train.{key}={getattr(self, key)}: must be in [0, 100]")
        _in_range("train.mix_prob", self.mix_prob, 0.0, 1.0)
        _in_range("train.mix_switch_prob", self.mix_switch_prob, 0.0, 1.0)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay!r}: must be in [0, 1); 0: off")
        _at_least("train.ema_batch", self.ema_batch, 1)
        _at_least("train.ema_every", self.ema_every, 1)
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _at_least("train.clip_grad_norm", self.clip_grad_norm, 0.0)
        _at_least("train.max_steps", self.max_steps, 0)
        _at_least("train.eval_every_epochs", self.eval_every_epochs, 1)
