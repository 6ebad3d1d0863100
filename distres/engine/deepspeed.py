"""The DeepSpeed engine: ZeRO 0-3, bf16 / fp16 / fp32, accumulation and clipping, all from
distres's one config.

The DeepSpeed config is derived (micro-batch, accumulation, global batch, ZeRO stage,
precision, clipping); a JSON given as engine.deepspeed_config adds what only DeepSpeed has
(offload, bucket sizes, ...). A key it sets that the derived config also sets must agree, or it
is an error naming both values. Our optimizer and LR schedule are handed to DeepSpeed as client
objects, so the schedule, weight-decay groups and LR scaling are those of the DDP engine.

Checkpoints go through engine.save_checkpoint / load_checkpoint (ZeRO-sharded optimizer state,
one file per rank) into the directory distres.checkpoint commits atomically; distres's own
state rides along as client state.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from distres.components.profiling import mark
from distres.config import BatchPlan, Config, ConfigError
from distres.data.api import Batch
from distres.dist import export_ranks
from distres.engine.base import EngineBase
from distres.errors import CheckpointError

TAG = "deepspeed"  # the tag directory inside a distres checkpoint
PARTS = "distres_parts"  # the client-state key of distres's tensor parts (the EMA)


class UntrustedCheckpoint(ValueError):
    """A DeepSpeed checkpoint file that the safe loader refuses; the message names it."""


def _safe_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors (read off
    ZeRO 0-3 checkpoints of DeepSpeed 0.19), admitted by exact class."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_loading(trust: bool = False):
    """DeepSpeed reads its files with torch.load(weights_only=False), a full unpickler: code in
    a crafted file would run. Inside this context every torch.load is weights_only=True with
    only DeepSpeed's own classes admitted; trust=True (the user vouches for the files) leaves
    DeepSpeed's loader as it is."""
    if trust:
        yield
        return
    import pickle

    original = torch.load
    admitted = _safe_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(admitted):
                return original(f, *args, **kwargs)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            first = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)
            raise UntrustedCheckpoint(
                f"{f}: refused by the safe loader ({first.strip()[:200]}); if you wrote this "
                "checkpoint yourself, --trust-checkpoint (checkpoint.trust=true in training) "
                "loads it with DeepSpeed's full unpickler"
            ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def checkpoint_files(directory: Path, zero_stage: int, world_size: int) -> list[Path]:
    """The files DeepSpeed writes for one checkpoint (the distres step directory)."""
    tag = directory / TAG
    if zero_stage == 3:  # parameters are partitioned too
        files = [tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    else:
        files = [tag / "mp_rank_00_model_states.pt"]
    if zero_stage > 0:
        files += [tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    return files


def validate_tensors(path: Path, meta: dict) -> None:
    """The files DeepSpeed needs are there (it reads them itself, through safe_loading)."""
    stage = meta["tensors"].get("zero_stage", 0)
    if stage not in (0, 1, 2, 3):
        raise CheckpointError(f"{path / 'meta.json'}: zero_stage={stage!r}")
    for f in checkpoint_files(path, stage, meta["layout"]["world_size"]):
        if not f.is_file() or f.stat().st_size == 0:
            raise CheckpointError(f"{f}: missing or empty")


def consolidated_weights(
    directory: Path, meta: dict, model: Any = None, trust: bool = False, part: str = "model"
) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO checkpoint, gathered in this process by DeepSpeed's own
    zero_to_fp32, through the safe loader unless trusted; part="ema": the EMA's, from the
    model-states file's client state."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with safe_loading(trust):
            if part != "model":
                states = torch.load(
                    directory / TAG / "mp_rank_00_model_states.pt", map_location="cpu"
                )
                return states[PARTS][part]
            return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
    except UntrustedCheckpoint as e:
        raise CheckpointError(str(e)) from None
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(
            f"{directory}: DeepSpeed cannot consolidate it ({type(e).__name__}: {e})"
        ) from None


def deepspeed_config(cfg: Config, plan: BatchPlan, amp_dtype: torch.dtype | None) -> dict:
    """DeepSpeed's config from ours, merged with engine.deepspeed_config (conflicts fail)."""
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": cfg.train.clip_grad_norm,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": amp_dtype == torch.bfloat16},
        "fp16": {"enabled": amp_dtype == torch.float16},
        # our torch optimizer is a client optimizer; ZeRO partitions its state
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    where = {
        "train_micro_batch_size_per_gpu": "train.batch_size",
        "gradient_accumulation_steps": "train.grad_accum / train.global_batch",
        "train_batch_size": "train.batch_size x grad_accum x world size",
        "gradient_clipping": "train.clip_grad_norm",
        "zero_optimization.stage": "engine.zero_stage",
        "bf16.enabled": "train.precision",
        "fp16.enabled": "train.precision",
    }
    path = cfg.engine.deepspeed_config
    if not path:
        return ours
    try:
        theirs = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"engine.deepspeed_config={path}: unreadable JSON ({e})") from None
    for key in ("optimizer", "scheduler"):
        if key in theirs:
            raise ConfigError(
                f"engine.deepspeed_config={path}: sets {key!r}; the {key} comes from the optim "
                "section (distres hands DeepSpeed its own), remove it from the JSON"
            )
    return _merge(ours, theirs, path, where)


def _merge(ours: dict, theirs: dict, path: str, where: dict, prefix: str = "") -> dict:
    merged = dict(ours)
    for key, value in theirs.items():
        name = f"{prefix}{key}"
        if key not in ours:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(ours[key], dict):
            merged[key] = _merge(ours[key], value, path, where, f"{name}.")
        elif value != ours[key] and value != "auto":
            raise ConfigError(
                f"engine.deepspeed_config={path} sets {name}={value!r}, but the distres config "
                f"gives {ours[key]!r} ({where.get(name, name)}); remove it from the JSON or "
                "change the distres setting"
            )
    return merged


class DeepSpeedEngine(EngineBase):
    def __init__(self, *args, **kwargs):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # its per-step INFO lines would drown ours
        super().__init__(*args, **kwargs)
        cfg, env, device, plan = self.cfg, self.env, self.device, self.plan
        # NOTE: the weights stay in contiguous (NCHW) memory: DeepSpeed views every parameter as
        # bytes to broadcast and flatten it. Inputs still arrive channels_last, and convolution
        # picks the channels_last kernels when its input is channels_last.
        model = self.build_model().to(device)
        optimizer, scheduler = self.build_optimizer(model)
        self.ds_config = deepspeed_config(cfg, plan, self.amp_dtype)
        if cfg.checkpoint.async_save:
            raise ConfigError(
                "checkpoint.async_save=true with engine.name=deepspeed: DeepSpeed writes its "
                "checkpoints synchronously here; set checkpoint.async_save=false"
            )
        export_ranks(env, device)  # DeepSpeed reads its ranks from the environment
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.set_module(self.ds.module)
        # DeepSpeed owns loss scaling (fp16) and converts the model to bf16/fp16 itself.
        self.input_dtype = {torch.bfloat16: torch.bfloat16, torch.float16: torch.half}.get(
            self.amp_dtype, torch.float32
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        # The module's weights are already in the training dtype; inputs are cast to it.
        return contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ds(images.to(self.input_dtype))

    last_grad_norm: torch.Tensor | float | None = None

    def train_step(self, micro_batches: list[Batch], grad_norm: bool = False) -> torch.Tensor:
        """k micro-batches, one optimizer step: DeepSpeed scales each loss by 1/k and steps
        (optimizer, then LR schedule) at the accumulation boundary."""
        k = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for images, labels in micro_batches:
            with mark("forward"):
                loss = self.loss(self.forward(images), labels)
            with mark("backward"):
                self.ds.backward(loss)
            with mark("optimizer"):  # a no-op until the accumulation boundary
                self.ds.step()
            total += loss.detach() / k
        # DeepSpeed computes the global norm itself when it clips (None otherwise)
        self.last_grad_norm = self.ds.get_global_grad_norm() if grad_norm else None
        return total

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on every rank (a collective under ZeRO-3, whose
        parameters are partitioned across ranks)."""
        if self.cfg.engine.zero_stage < 3:
            return self.module.state_dict()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    # -- checkpoints: DeepSpeed's own files under deepspeed/ -------------------------------
    def checkpoint_info(self) -> dict:
        return {"format": "deepspeed", "zero_stage": self.cfg.engine.zero_stage}

    def save_tensors(
        self, directory: Path, group: Any, async_save: bool, parts: dict[str, dict] | None = None
    ) -> None:
        """A collective: every rank writes its ZeRO partition (one file per rank); the tensor
        parts (replicated) ride in the model-states file as client state."""
        self.sync_buffers()
        self.ds.save_checkpoint(
            str(directory), tag=TAG, client_state={PARTS: parts or {}}, save_latest=False
        )

    def load_tensors(
        self, directory: Path, meta: dict, parts: dict[str, dict] | None = None
    ) -> None:
        saved_world = meta["layout"]["world_size"]
        tag, universal = TAG, False
        if saved_world != self.env.world_size and self.cfg.engine.zero_stage > 0:
            # ZeRO partitions of another world size: DeepSpeed's universal checkpoint, made
            # once beside the checkpoint by its own tool, loads on any world size
            stage = self.cfg.engine.zero_stage
            tag, universal = universal_checkpoint(directory, saved_world, stage, self.env), True
        self.ds._config.load_universal_checkpoint = universal
        try:
            with safe_loading(self.cfg.checkpoint.trust):
                path, client = self.ds.load_checkpoint(
                    str(directory),
                    tag=tag,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                )
        except UntrustedCheckpoint as e:
            raise CheckpointError(str(e)) from None
        if path is None:
            raise CheckpointError(f"checkpoint {directory}: DeepSpeed found no {TAG}/ state in it")
        saved = (client or {}).get(PARTS, {})
        with torch.no_grad():
            for name, state in (parts or {}).items():
                theirs = saved.get(name)
                if not isinstance(theirs, dict) or theirs.keys() != state.keys():
                    raise CheckpointError(f"checkpoint {directory}: its {name!r} part is damaged")
                for key, tensor in state.items():
                    tensor.copy_(theirs[key])


UNIVERSAL = "deepspeed-universal"  # DeepSpeed's universal checkpoint, beside its own files


def universal_checkpoint(directory: Path, saved_world: int, stage: int, env) -> str:
    """The tag of `directory`'s universal checkpoint (DeepSpeed's ds_to_universal: ZeRO
    partitions of any world size into per-parameter files), converted once by rank 0 while
    the others wait; every rank raises the same one-line ConfigError where DeepSpeed cannot
    convert it (its converter knows Adam-style optimizer states, not SGD's momentum)."""
    import torch.distributed as dist

    from distres.dist import from_main

    target = directory / UNIVERSAL
    problem = None
    if env.is_main and not target.is_dir():
        problem = _convert(directory / TAG, target)
    if dist.is_available() and dist.is_initialized():
        problem = from_main(problem, env)  # a broadcast: the others wait for the conversion
    if problem is not None:
        raise ConfigError(
            f"checkpoint {directory} holds ZeRO-{stage} optimizer partitions of {saved_world} "
            f"rank(s), this run has {env.world_size}, and DeepSpeed's ds_to_universal cannot "
            f"make it a universal checkpoint ({problem}); resume on {saved_world} rank(s)"
        )
    return UNIVERSAL


def _convert(source: Path, target: Path) -> str | None:
    """ds_to_universal of `source` into `target` (through a temporary name); why not."""
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # its own command line's options; one worker: no process pool forked from a process
    # that has run OpenMP (a fork deadlocks there)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)  # fmt: skip
    try:
        quiet = io.StringIO()  # its progress lines and bars
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            ds_to_universal.main(args)
    except Exception as e:  # its assertions and KeyErrors: what it cannot convert
        shutil.rmtree(tmp, ignore_errors=True)
        what = f"{type(e).__name__}: {e}"
        return what if "exp_avg" not in str(e) else "its optimizer state has no exp_avg: SGD"
    tmp.rename(target)
    return None
