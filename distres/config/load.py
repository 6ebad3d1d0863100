"""Loading a config: YAML presets (with `base:`), `key=value` overrides, settings without
effect refused, the batch plan for a world size, and the --help text."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distres.config.base import ConfigError
from distres.config.schema import Config

log = logging.getLogger("distres")

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
    (
        "data.ra_magnitude",
        lambda c: c.data.auto_augment == "randaugment",
        "data.auto_augment=randaugment",
    ),
    (
        "data.ra_num_ops",
        lambda c: c.data.auto_augment == "randaugment",
        "data.auto_augment=randaugment",
    ),
    ("train.bce_threshold", lambda c: c.train.loss == "bce", "train.loss=bce"),
    *(
        (f"train.{key}", lambda c: c.train.ema_decay > 0, "train.ema_decay > 0")
        for key in ("ema_batch", "ema_every", "ema_warmup")
    ),
    (
        "train.mix_prob",
        lambda c: c.train.mixup_alpha > 0 or c.train.cutmix_alpha > 0,
        "train.mixup_alpha or train.cutmix_alpha > 0",
    ),
    (
        "train.mix_switch_prob",
        lambda c: c.train.mixup_alpha > 0 and c.train.cutmix_alpha > 0,
        "both train.mixup_alpha and train.cutmix_alpha > 0",
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


def plan_batch(cfg: Config, world_size: int, target: int | None = None) -> BatchPlan:
    """Resolve gradient accumulation for this world size (checked before any group exists):
    for train.global_batch, or `target` (a resumed checkpoint's global batch). Where the
    world size cannot make it, train.elastic_batch says what happens (one line either way)."""
    micro = cfg.train.batch_size
    target = target or cfg.train.global_batch
    if not target:
        return BatchPlan(micro, cfg.train.grad_accum, world_size)
    per_step = micro * world_size
    if target % per_step == 0:
        return BatchPlan(micro, target // per_step, world_size)
    what = (
        f"train.global_batch={target}"
        if target == cfg.train.global_batch
        else f"the checkpoint's global batch {target}"
    )
    if cfg.train.elastic_batch == "exact":
        worlds = [w for w in range(1, 1025) if target % (micro * w) == 0]
        keep = (
            f"world sizes that keep it: {', '.join(map(str, worlds[:12]))}"
            if worlds
            else f"no world size keeps it with train.batch_size={micro} (use a divisor of {target})"
        )
        raise ConfigError(
            f"{what} is not a multiple of train.batch_size={micro} x {world_size} ranks = "
            f"{per_step}; {keep}; or train.elastic_batch=nearest to take the nearest global "
            "batch this world size can make"
        )
    plan = BatchPlan(micro, max(1, round(target / per_step)), world_size)
    lr = (
        f"the lr follows it (x {plan.global_batch / target:.4g}, optim.lr_scaling=linear)"
        if cfg.optim.lr_scaling == "linear"
        else "the lr stays (optim.lr_scaling=none)"
    )
    log.warning(
        f"WARNING: train.elastic_batch=nearest: {what} on {world_size} rank(s) of {micro} becomes "
        f"{plan.global_batch} (grad_accum {plan.grad_accum}); {lr}"
    )
    return plan


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
    from distres.io import atomic_write

    atomic_write(path, to_yaml(cfg))


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
