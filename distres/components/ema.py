"""An exponential moving average of the weights (timm's ModelEmaV3, torchvision's
ExponentialMovingAverage), kept right at scale.

- fp32 on the training device, updated in place by one multi-tensor lerp: no host sync (the
  decay is a Python number, computed from the step count).
- Its decay is stated per `train.ema_batch` samples: an update after S samples decays by
  ema_decay ** (S / ema_batch). A resume on another world size or global batch keeps the
  horizon, in samples (about ema_batch / (1 - ema_decay)).
- Parameters are the same on every rank (DDP, ZeRO-1/2); batch-norm statistics are not (each
  rank updates its own), so the EMA's are averaged over ranks before every evaluation and save.
- A checkpoint part whose state is tensors: the engine writes them beside its own (DCP under
  "ema", DeepSpeed's client state), so they reshard as the engine's do.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from distres.config import Config
from distres.dist import DistEnv, average_buffers
from distres.models import build_model

log = logging.getLogger("distres")

WARMUP_POWER = 2 / 3  # timm's ModelEmaV3 warm-up: decay <= 1 - (1 + t) ** -power


class WeightEma:
    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg.train, env
        # A model of its own, in eval mode, holding fp32 copies of the model's tensors on the
        # same device and in the same memory format (DeepSpeed's module may be bf16/fp16, and
        # carries DeepSpeed's hooks: not deep-copied).
        with torch.random.fork_rng(devices=[]):  # its init draws leave the run's RNG alone
            self.module = build_model(cfg.model)
        self.module.freeze(cfg.model.freeze)  # frozen parts' statistics stay exactly as loaded
        self.module.eval().requires_grad_(False)
        theirs = model.state_dict()
        with torch.no_grad():
            for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
                src = theirs[name].detach()
                t.data = (src.float() if src.is_floating_point() else src).clone()
        self.bind(model)

    def bind(self, model: nn.Module) -> None:
        """The (EMA tensor, model tensor) pairs an update reads, in state_dict order."""
        ours, theirs = self.module.state_dict(), model.state_dict()
        self.floats = [(ours[k], theirs[k]) for k in ours if ours[k].is_floating_point()]
        self.counts = [(ours[k], theirs[k]) for k in ours if not ours[k].is_floating_point()]

    def decay(self, samples_seen: int, samples: int) -> float:
        """The decay of an update after `samples` more samples, `samples_seen` in all."""
        per_batch = self.cfg.ema_decay
        if self.cfg.ema_warmup:
            t = samples_seen / self.cfg.ema_batch
            per_batch = min(per_batch, 1.0 - (1.0 + t) ** -WARMUP_POWER)
        return max(0.0, per_batch) ** (samples / self.cfg.ema_batch)

    @torch.no_grad()
    def update(self, step: int, samples_seen: int, global_batch: int) -> None:
        """After optimizer step `step` (counted from 1): every ema_every steps, move toward
        the model by the decay of the steps' samples."""
        every = self.cfg.ema_every
        if step % every:
            return
        weight = 1.0 - self.decay(samples_seen, every * global_batch)
        ema = [e for e, _ in self.floats]
        src = [m if m.dtype == e.dtype else m.float() for e, m in self.floats]
        torch._foreach_lerp_(ema, src, weight)
        for e, m in self.counts:  # BN's num_batches_tracked: a count, not averaged
            e.copy_(m)

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average the EMA's BN statistics over ranks (each rank's drifted with its data)."""
        if self.env.distributed:
            average_buffers(self.module, self.env.world_size)

    def horizon(self, global_batch: int) -> str:
        """One line for the start of a run: what the decay means for this batch."""
        per_step = self.cfg.ema_decay ** (global_batch / self.cfg.ema_batch)
        samples = self.cfg.ema_batch / max(1e-12, 1.0 - self.cfg.ema_decay)
        every = self.cfg.ema_every
        return (
            f"EMA of the weights: decay {self.cfg.ema_decay} per {self.cfg.ema_batch} samples "
            f"= {per_step:.6g} per step of {global_batch}, applied every {every} step(s); "
            f"horizon ~{samples:,.0f} samples" + (", warm-up on" if self.cfg.ema_warmup else "")
        )

    # -- a checkpoint part of tensors ------------------------------------------------------
    def before_save(self) -> None:
        self.sync_buffers()  # one set of BN statistics, whichever rank writes them

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA's weights and buffers (the live tensors: a load fills them in place)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.module.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                if own[key] is not value:
                    own[key].copy_(value)

    def missing(self, model: nn.Module) -> None:
        """A checkpoint without an EMA (it was off when it was written): start from the
        weights just loaded."""
        self.load_state_dict(model.state_dict())
        log.info("the checkpoint holds no EMA (train.ema_decay was 0): it starts from its weights")
