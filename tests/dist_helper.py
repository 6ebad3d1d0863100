"""Run under torchrun (or with Slurm's variables) by test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/dist_helper.py \
        MODE OUT_DIR [section.key=value ...]

MODE train: the real distres.trainer.run() on this rank (faults through its Hooks seam);
writes OUT_DIR/rank<r>.json with the summary, a hash of the final weights and the exit code
main() would give. FAULT=nan:<rank>:<step>
in the environment makes that rank's loss NaN at that optimizer step.
MODE accum: one optimizer step over fixed data; rank 0 writes the updated weights.
MODE eval: evaluate fixed weights on the digits val set; rank 0 writes the metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from distres.config import load_config, plan_batch
from distres.dist import pick_device, process_group, read_env
from distres.trainer.hooks import Hooks


def weights_hash(module: torch.nn.Module | dict) -> str:
    state = module if isinstance(module, dict) else module.state_dict()
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Probe(Hooks):
    """The trainer's seam: FAULT=nan:<rank>:<step> poisons that rank's loss at that step;
    the final weights' hashes (and the EMA's, at the end and right after a resume)."""

    def __init__(self, fault: str):
        self.captured: dict[str, str] = {}
        self.nan_at = None
        if fault.startswith("nan:"):
            _, rank, step = fault.split(":")
            self.nan_at = (int(rank), int(step))

    def after_step(self, trainer, loss):
        if self.nan_at == (trainer.env.rank, trainer.state.step + 1):
            return loss * float("nan")
        return loss

    def after_restore(self, trainer):
        if "ema" in trainer.tensor_parts:
            self.captured["ema_at_resume"] = weights_hash(trainer.tensor_parts["ema"].module)

    def after_fit(self, trainer, summary):
        self.captured["hash"] = weights_hash(trainer.engine.module)
        if "ema" in trainer.tensor_parts:  # its BN statistics were averaged at the last save
            self.captured["ema"] = weights_hash(trainer.tensor_parts["ema"].module)


def mode_train(out: Path, overrides: list[str]) -> int:
    from distres.errors import STOP_CODES
    from distres.trainer import run

    env = read_env()
    (out / f"pid.{env.rank}").write_text(str(os.getpid()))
    probe = Probe(os.environ.get("FAULT", ""))
    summary = run(load_config(None, overrides), hooks=probe)
    code = STOP_CODES[summary["stop_reason"]]
    record = {"rank": env.rank, "summary": summary, "exit": code, **probe.captured}
    (out / f"rank{env.rank}.json").write_text(json.dumps(record))
    return code


def mode_accum(out: Path, overrides: list[str]) -> int:
    from distres.data.api import Batch
    from distres.engine import build_engine

    env = read_env()
    cfg = load_config(None, overrides)
    plan = plan_batch(cfg, env.world_size)
    device = pick_device("cpu", env.local_rank)
    with process_group(env, device):
        torch.manual_seed(0)
        engine = build_engine(cfg, env, device, plan, steps_per_epoch=10)
        engine.module.eval()  # BN in eval mode: the update is independent of the split
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(32, 3, 32, 32, generator=gen)
        labels = torch.randint(0, 10, (32,), generator=gen)
        per_rank = 32 // env.world_size
        mine = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
        x, y = images[mine], labels[mine]
        micro = [
            Batch(xs.contiguous(memory_format=torch.channels_last), ys)
            for xs, ys in zip(x.split(plan.micro_batch), y.split(plan.micro_batch), strict=True)
        ]
        assert len(micro) == plan.grad_accum, (len(micro), plan)
        engine.train_step(micro)
        if env.is_main:
            torch.save(engine.module.state_dict(), out / "accum.pt")
    return 0


def mode_eval(out: Path, overrides: list[str]) -> int:
    from distres.data import build_loaders
    from distres.models import build_model
    from distres.precision import resolve_precision
    from distres.results.evaluation import evaluate

    env = read_env()
    cfg = load_config(None, overrides)
    device = pick_device("cpu", env.local_rank)
    with process_group(env, device):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
        _, val = build_loaders(cfg, device, env.rank, env.world_size)
        assert resolve_precision(cfg.train.precision, device) is None
        import contextlib

        metrics = evaluate(model, val, device, contextlib.nullcontext)
        metrics["local_samples"] = val.num_samples()
        (out / f"eval{env.rank}.json").write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    mode, out_dir, *rest = sys.argv[1:]
    torch.set_num_threads(1)
    code = {"train": mode_train, "accum": mode_accum, "eval": mode_eval}[mode](Path(out_dir), rest)
    if code:  # a success returns: under `torchrun --run-path` the agent waits for the return
        sys.exit(code)
