"""The config tree: one dataclass per section, checks of values and of fields against each
other. No I/O, no imports of data/ or engine/ (distres.preflight checks the machine)."""

from __future__ import annotations

from dataclasses import dataclass, field

from distres.config.base import ConfigError, _at_least, _choice, _in_range, doc
from distres.config.data import DataConfig
from distres.config.train import TrainConfig
from distres.models.archs import ARCHS


@dataclass
class RunConfig:
    name: str = doc("digits-resnet20", "run name; the default run.dir is runs/<name>-<timestamp>")
    dir: str = doc("", "output directory; empty means runs/<name>-<timestamp>")
    seed: int = doc(
        0,
        "random seed: the same initial weights on every rank; data order and augmentation "
        "draw from it with the rank, worker and epoch",
    )
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
    drop_path_rate: float = doc(
        0.0,
        "stochastic depth: the last block's residual branch is dropped for this fraction of "
        "the samples in training, earlier blocks linearly less (timm's drop_path; RSB A3: "
        "0.05, torchvision's v2 recipe: 0); adds no parameters; 0: off",
    )
    init_from: str = doc(
        "",
        "fine-tuning: initial weights from a .safetensors file, a .pth/.pt state dict "
        "(weights_only), a distres final/ or checkpoint directory; distres, torchvision or timm "
        "names; a head of another size is re-initialised; a fresh start only (a resume loads "
        "its checkpoint)",
    )
    freeze: list[str] = doc(
        [],
        "parts left untrained, e.g. [stem, layer1]: stem, layer1..layerN, fc; their "
        "parameters get no gradient and their batch norms keep their running statistics",
    )

    def __post_init__(self) -> None:
        _choice("model.name", self.name, tuple(ARCHS))
        parts = ("stem", *(f"layer{i + 1}" for i in range(len(ARCHS[self.name].layers))), "fc")
        for part in self.freeze:
            _choice("model.freeze", part, parts)
        if len(set(self.freeze)) == len(parts):
            raise ConfigError(
                f"model.freeze={list(self.freeze)} freezes every part: nothing would train"
            )
        _at_least("model.num_classes", self.num_classes, 2)
        _at_least("model.in_chans", self.in_chans, 1)
        _in_range("model.drop_path_rate", self.drop_path_rate, 0.0, 0.9)
        if self.plain and self.drop_path_rate:
            raise ConfigError(
                f"model.drop_path_rate={self.drop_path_rate} with model.plain=True: a plain net "
                "has no shortcut, so dropping a branch would drop the whole signal; set one off"
            )
        if self.plain and self.zero_init_residual:
            raise ConfigError(
                "model.zero_init_residual=True with model.plain=True would zero every block's "
                "output (there is no shortcut to carry the signal); set one of them to false"
            )


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
    head_lr_mult: float = doc(
        1.0,
        "the classifier head's (fc) lr as a multiple of lr, at every step of the schedule "
        "(fine-tuning: a fresh head learns faster than the pretrained body)",
    )

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("sgd", "adamw", "lars", "lamb"))
        _choice("optim.lr_scaling", self.lr_scaling, ("none", "linear"))
        if self.head_lr_mult <= 0:
            raise ConfigError(f"optim.head_lr_mult={self.head_lr_mult!r}: must be > 0")
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


COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


@dataclass
class EngineConfig:
    name: str = doc("ddp", "ddp (DistributedDataParallel; plain on one process) | deepspeed")
    compile: bool = doc(False, "torch.compile the model")
    compile_mode: str = doc(
        "default",
        "torch.compile's mode: default | max-autotune (Triton autotuning, slow first steps) "
        "| max-autotune-no-cudagraphs | reduce-overhead (CUDA graphs of forward and backward: "
        "no per-kernel launch cost; the optimizer step stays outside)",
    )
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
    collective_timeout_s: int = doc(
        600,
        "seconds a rank waits in a collective before it fails: a peer that hangs (a frozen "
        "node; NCCL over NVLink does not see a dead peer at all) ends the attempt after this "
        "long, so an elastic agent can restart it (gloo fails at once on a closed connection)",
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
        _at_least("engine.collective_timeout_s", self.collective_timeout_s, 10)
        _choice("engine.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("engine.compile_mode", self.compile_mode, COMPILE_MODES)
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"engine.compile_mode={self.compile_mode} needs engine.compile=true")
        _ = self.checkpoint_group  # raises on a bad value
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
    every_minutes: float = doc(
        0.0,
        "also checkpoint when this many minutes of wall clock have passed since the last "
        "checkpoint (or the start), decided by all ranks together at a stop check "
        "(train.stop_check_every); bounds the work a crash or membership change loses; 0: off",
    )
    on_stop: bool = doc(True, "checkpoint when the run stops: completed, early stop, signal")
    keep_last: int = doc(2, "committed checkpoints kept, newest first (plus the best one)")
    keep_best: bool = doc(True, "also keep the best checkpoint by early_stop.monitor")
    async_save: bool = doc(False, "write in the background; training goes on meanwhile")
    resume: str = doc("auto", "auto (latest complete one in the dir, if any) | none | PATH")
    save_final: bool = doc(True, "write final/model.safetensors and final/model.yaml")
    final_weights: str = doc(
        "model",
        "model | ema: which weights final/ (and distres.predict) gets; ema needs "
        "train.ema_decay > 0",
    )
    trust: bool = doc(
        False,
        "engine.name=deepspeed: load DeepSpeed's checkpoint files with its full unpickler "
        "(only for checkpoints you wrote); false reads them with weights_only=True",
    )

    def __post_init__(self) -> None:
        _at_least("checkpoint.every_steps", self.every_steps, 0)
        _at_least("checkpoint.every_epochs", self.every_epochs, 0)
        _at_least("checkpoint.every_minutes", self.every_minutes, 0.0)
        _at_least("checkpoint.keep_last", self.keep_last, 1)
        if not self.resume:
            raise ConfigError("checkpoint.resume='': use auto, none or a checkpoint path")
        _choice("checkpoint.final_weights", self.final_weights, ("model", "ema"))

    @property
    def enabled(self) -> bool:
        return bool(self.every_steps or self.every_epochs or self.every_minutes or self.on_stop)


@dataclass
class EarlyStopConfig:
    patience: int = doc(0, "evaluations without improvement before stopping; 0: off")
    monitor: str = doc(
        "val/top1",
        "val/top1 | val/top5 | val/loss, or val_ema/* (the EMA's, with train.ema_decay > 0); "
        "also picks the best checkpoint",
    )
    mode: str = doc("auto", "auto (max for accuracies, min for loss) | max | min")
    min_delta: float = doc(0.0, "an improvement must exceed this")

    def __post_init__(self) -> None:
        _at_least("early_stop.patience", self.patience, 0)
        _choice(
            "early_stop.monitor",
            self.monitor,
            tuple(f"{p}/{m}" for p in ("val", "val_ema") for m in ("top1", "top5", "loss")),
        )
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
    ledger: bool = doc(
        False,
        "at the end, every val sample's top-5 and loss in <run.dir>/ledger/val.jsonl, the "
        "per-class table, plots/confusion_val.png and plots/hardest_val.png (W&B too)",
    )
    sample_log: bool = doc(
        False,
        "each rank logs the keys of the samples every optimizer step trained on, in "
        "<run.dir>/samples/rank-<R>.jsonl (an audit of the data order across resumes)",
    )
    tensorboard: bool = doc(
        False, "also write the scalars to TensorBoard under <run.dir>/tensorboard (rank 0)"
    )
    profile_steps: list[int] = doc(
        [],
        "[start, stop]: torch.profiler over optimizer steps start..stop (1-based) on every "
        "rank, traces in <run.dir>/profile/, and a 'where the step time goes' table; []: off",
    )

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
        steps = self.profile_steps
        if steps and (
            len(steps) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in steps)
            or not 1 <= steps[0] <= steps[1]
        ):
            raise ConfigError(
                f"tracking.profile_steps={steps}: expected [start, stop] with 1 <= start <= "
                "stop (optimizer steps, e.g. [10, 15]), or [] for off"
            )


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
        which, small = "image_size", size
        if self.data.val_size and self.data.val_size < size:
            which, small = "val_size", self.data.val_size
        if arch.stem != "cifar" and small < 64:
            raise ConfigError(
                f"data.{which}={small} with model.name={self.model.name}: ImageNet-stem "
                "models downsample 32x and need >= 64 px; use a CIFAR-style model (resnet20..."
                "resnet1202, preact_resnet164/1001) for small images"
            )
        big = max(size, self.data.eval_size)
        which = "image_size" if big == size else "val_size"
        if arch.stem == "cifar" and big > 64:
            raise ConfigError(
                f"data.{which}={big} with model.name={self.model.name}: CIFAR-style models "
                "keep full resolution in stage 1 and are meant for <= 64 px; use resnet18..152 "
                "or another ImageNet-stem model"
            )
        ema = self.train.ema_decay > 0
        if not ema and (self.early_stop.monitor.startswith("val_ema/")):
            raise ConfigError(
                f"early_stop.monitor={self.early_stop.monitor} with train.ema_decay=0: there is "
                "no EMA to evaluate; set train.ema_decay (e.g. 0.9998) or monitor val/*"
            )
        if not ema and self.checkpoint.final_weights == "ema":
            raise ConfigError(
                "checkpoint.final_weights=ema with train.ema_decay=0: there is no EMA; set "
                "train.ema_decay or checkpoint.final_weights=model"
            )
        if ema and self.engine.name == "deepspeed" and self.engine.zero_stage == 3:
            raise ConfigError(
                f"train.ema_decay={self.train.ema_decay} with engine.zero_stage=3: ZeRO-3 "
                "partitions the parameters, so no rank holds the whole model to average; use "
                "engine.zero_stage=1 or 2 (their parameters are replicated)"
            )
        if self.data.auto_augment != "none" and self.model.in_chans != 3:
            raise ConfigError(
                f"data.auto_augment={self.data.auto_augment} with model.in_chans="
                f"{self.model.in_chans}: its colour operators (color, contrast, equalize) are "
                "defined on RGB images; use data.auto_augment=none"
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
