"""What a run leaves in its run directory, by name, in one place:

config.yaml      the resolved config
metrics.jsonl    one record per log interval, evaluation, resume, profile
summary.json     how the run ended (rank 0, at the end)
checkpoints/     step-N/ checkpoints, latest, best.json (distres.checkpoint)
final/           model.safetensors, model.yaml, inference.json (distres.artifacts.final)
ledger/          SPLIT.jsonl and SPLIT.json (distres.results.ledger)
plots/           curves.png and the ledger's pictures
profile/         traces (tracking.profile_steps)
tensorboard/, wandb/   the sinks' own files
.lock            which run owns the directory now (distres.artifacts.lock)
"""

from __future__ import annotations

from pathlib import Path

CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.jsonl", "summary.json"
CHECKPOINTS, FINAL, LEDGER, PLOTS, PROFILE = "checkpoints", "final", "ledger", "plots", "profile"
LOCK = ".lock"


def run_dir_of(checkpoint: Path, cfg) -> Path:
    """The run directory a checkpoint belongs to: <run>/checkpoints/step-N, wherever the run
    has moved since, else (checkpoint.dir elsewhere) the run.dir its config names."""
    run = Path(checkpoint).resolve().parent.parent
    return run if (run / METRICS).is_file() else Path(cfg.run.dir)
