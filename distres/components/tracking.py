"""Where results go: metrics.jsonl, summary.json, progress on the console, and the sinks
(W&B, TensorBoard) that `Sinks` describes and the Tracker opens when the run starts.

Only rank 0 tracks; other ranks get a Tracker with enabled=False whose calls do nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from distres.errors import WriteError, why
from distres.io import atomic_write, write_json


def wandb_mode(setting: str) -> str | None:
    """tracking.wandb resolved: online when asked, or on auto when an API key is configured
    (WANDB_API_KEY or a netrc login); offline otherwise; None when off."""
    if setting == "off":
        return None
    if setting != "auto":
        return setting
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode == "disabled":
        return None
    if env_mode in ("offline", "online"):
        return env_mode
    return "online" if os.environ.get("WANDB_API_KEY") or _netrc_key() else "offline"


def _netrc_key() -> str | None:
    """The key `wandb login` stores in ~/.netrc for the W&B host."""
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


class WandbRun:
    """The job's one W&B run (rank 0 only). Its id is kept in every checkpoint, and a resumed
    or requeued job passes it back with resume="allow", so the run continues."""

    def __init__(
        self,
        run_dir: Path,
        mode: str,
        project: str,
        entity: str,
        name: str,
        run_id: str,
        config: dict,
    ):
        import wandb

        if os.environ.get("WANDB_MODE") == "":
            del os.environ["WANDB_MODE"]  # W&B rejects an empty mode; ours is passed below
        self.run = wandb.init(
            project=project,
            entity=entity or None,
            name=name,
            id=run_id or None,  # None: W&B picks one; it is kept in every checkpoint
            resume="allow",
            mode=mode,
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(console="off", quiet=True, silent=True),
        )
        self.id = self.run.id
        self.run.define_metric("*", step_metric="step")

    def log(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "event"}
        self._guard(self.run.log, values)

    def summary(self, summary: dict[str, Any]) -> None:
        values = {k: v for k, v in summary.items() if isinstance(v, int | float | str) or v is None}
        self._guard(self.run.summary.update, values)

    def ledger(self, result: dict[str, Any], step: int) -> None:
        """The ledger's per-class table (a W&B Table) and its two pictures."""
        import wandb

        summary = json.loads(Path(result["ledger"]).with_suffix(".json").read_text())
        columns = ["class", "name", "support", "top1", "top5", "loss", "confused_with"]
        table = wandb.Table(
            columns=columns, data=[[r[c] for c in columns] for r in summary["per_class"]]
        )
        images = {f"ledger/{k}": wandb.Image(v) for k, v in result["pictures"].items()}
        self._guard(self.run.log, {"ledger/per_class": table, **images, "step": step})

    def finish(self, exit_code: int = 0) -> None:
        self._guard(self.run.finish, exit_code=exit_code)

    broken = False

    def _guard(self, fn, *args, **kwargs) -> None:
        """A W&B failure never stops training: metrics.jsonl has every record anyway. (Slurm's
        SIGTERM, for one, reaches W&B's service process too, and it may die first.)"""
        if self.broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # wandb raises many types once its service is gone
            self.broken = True
            print(
                f"[distres] W&B stopped ({type(e).__name__}: {e}); training goes on, "
                "metrics.jsonl keeps every record",
                file=sys.stderr,
                flush=True,
            )


class TensorBoardRun:
    """tracking.tensorboard: the train and eval scalars as TensorBoard events (rank 0), under
    <run.dir>/tensorboard. A resumed run purges the events written after its checkpoint's
    step, as metrics.jsonl drops its records, so every step has one value."""

    def __init__(self, run_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=first_step + 1 if first_step else None
        )

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for k, v in record.items():
            if k not in ("step", "event") and isinstance(v, int | float) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


def tensorboard_problem() -> str | None:
    """Why tracking.tensorboard=true cannot run here, or None (checked on every rank before
    training, so no rank fails alone)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return (
            "tracking.tensorboard=true needs the tensorboard package: pip install tensorboard "
            "(or pip install 'distres[tensorboard]')"
        )
    return None


def run_info(cfg, env, device, plan, params: int) -> dict:
    """What W&B records once per run: the resolved config and where and how it ran."""
    import subprocess

    import torch
    import yaml

    from distres.config import to_yaml

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    return {
        **yaml.safe_load(to_yaml(cfg)),
        "model_params": params,
        "global_batch": plan.global_batch,
        "grad_accum": plan.grad_accum,
        "world_size": env.world_size,
        "git_rev": rev or "unknown",
        "hardware": {
            "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if gpus else None,
            "gpus_per_node": gpus,
            "cpu_count": os.cpu_count(),
        },
        "torch": torch.__version__,
    }


@dataclasses.dataclass
class Sinks:
    """The sinks a run writes to besides metrics.jsonl, opened by Tracker.open when it starts
    (after a resume: W&B continues the run whose id the checkpoint kept)."""

    wandb: str | None = None  # its mode (wandb_mode), None: off
    project: str = "distres"
    entity: str | None = None
    name: str = ""
    info: Callable[[int], dict] | None = None  # what W&B records once, given the param count
    tensorboard: bool = False


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class Tracker:
    """metrics.jsonl records, the progress display, and summary.json."""

    def __init__(
        self,
        run_dir: Path,
        progress: str,
        total_steps: int,
        epochs: int,
        log_every: int,
        enabled: bool = True,
        sinks: Sinks | None = None,
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.sinks = sinks or Sinks()
        self.total_steps, self.epochs, self.log_every = total_steps, epochs, log_every
        self.console = Console(file=sys.stdout)
        if progress == "auto":
            progress = "bar" if self.console.is_terminal else "log"
        self.mode = progress if enabled else "off"
        # Held open for the run's lifetime (closed in close()); appended to, so a resumed run
        # continues the same file.
        self._metrics = open(self.run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self._bar: Progress | None = None
        self._task = None
        self.wandb: WandbRun | None = None  # opened by open() on rank 0
        self.tensorboard: TensorBoardRun | None = None  # likewise
        self._t0 = time.perf_counter()
        self._first_step = 0

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a run resumes from), so the
        train and eval records read as one uninterrupted history; a "resume" record then marks
        where it continued."""
        if not self.enabled or self._metrics is None:
            return
        self._metrics.close()
        self._metrics = None
        path = self.run_dir / "metrics.jsonl"
        try:
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step
            ]
            atomic_write(path, "".join(line + "\n" for line in kept))
            self._metrics = open(path, "a")  # noqa: SIM115
        except (OSError, ValueError) as e:  # the run goes on (rank 0 alone: no collective)
            self.print(f"metrics.jsonl: not continued ({e}); the run's records stop here")

    def open(self, state: Any, params: int) -> None:
        """Open the sinks (rank 0): W&B with the run id the train state holds (a resumed job
        continues its run; a new id is kept there for the next checkpoint), TensorBoard from
        the current step."""
        if not self.enabled:
            return
        s = self.sinks
        if s.wandb is not None:
            info = s.info(params) if s.info is not None else {}
            self.wandb = WandbRun(self.run_dir, s.wandb, s.project, s.entity, s.name,
                                  state.wandb_id, info)  # fmt: skip
            state.wandb_id = self.wandb.id
        if s.tensorboard:
            self.tensorboard = TensorBoardRun(self.run_dir, state.step)

    def start(self, first_step: int = 0) -> None:
        self._t0 = time.perf_counter()
        self._first_step = first_step
        if self.mode == "bar":
            self._bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "train", total=self.total_steps, completed=first_step, epoch="-", stats=""
            )

    def step(self, step: int, epoch: int) -> None:
        """Called every optimizer step; cheap (no formatting or I/O outside the bar)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step, epoch=f"{epoch + 1}/{self.epochs}")

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (and W&B history row); train records also update the
        console."""
        if not self.enabled:
            return
        if self._metrics is not None:
            try:
                self._metrics.write(json.dumps(record) + "\n")
                self._metrics.flush()
            except OSError as e:  # a full disk: the run goes on, its records say where
                self.print(f"metrics.jsonl: not written from step {record.get('step')} on "
                           f"({why(e)})")  # fmt: skip
                self._metrics = None
        if record.get("event") in ("train", "eval"):  # a resume record is history
            if self.wandb is not None:
                self.wandb.log(record)
            if self.tensorboard is not None:
                self.tensorboard.log(record)
        if record.get("event") == "train":
            stats = (
                f"loss {record['train/loss']:.4f} lr {record['lr']:.4g} "
                f"{record['img_per_s']:.0f} img/s"
            )
            if self._bar is not None:
                self._bar.update(self._task, stats=stats)
            elif self.mode == "log":
                step = record["step"]
                elapsed = time.perf_counter() - self._t0
                done = max(1, step - self._first_step)
                eta = elapsed / done * (self.total_steps - step)
                self.print(
                    f"epoch {record['epoch'] + 1}/{self.epochs} step {step}/"
                    f"{self.total_steps} {stats} eta {_fmt_duration(eta)}"
                )
        elif record.get("event") == "eval" and self.mode != "off":
            self.print(
                f"eval  epoch {record['epoch'] + 1}/{self.epochs} step {record['step']} "
                f"val/loss {record['val/loss']:.4f} val/top1 {record['val/top1']:.4f} "
                f"val/top5 {record['val/top5']:.4f}"
                + (
                    f" val_ema/top1 {record['val_ema/top1']:.4f}"
                    if "val_ema/top1" in record
                    else ""
                )
            )

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line, highlight=False, markup=False)
        else:
            # Plain writes: no control characters in logs under Slurm or a pipe.
            print(f"[distres] {line}", flush=True)

    def summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in summary.items()
        }
        try:
            write_json(self.run_dir / "summary.json", clean, indent=1)
        except WriteError as e:  # the run's outcome stands (its exit code says it)
            self.print(f"summary: not written ({e})")
        if self.wandb is not None:
            self.wandb.summary(clean)

    def ledger(self, result: dict[str, Any], step: int) -> None:
        """A ledger's (distres.results.ledger) lines, and its table and pictures in W&B."""
        if not self.enabled:
            return
        self.print(
            f"ledger: {result['ledger']} ({result['val/samples']} samples, val/top1 "
            f"{result['val/top1']:.4f}); pictures: {', '.join(result['pictures'].values())}"
        )
        if self.wandb is not None:
            self.wandb.ledger(result, step)

    def finish(self, failed: bool = False) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
