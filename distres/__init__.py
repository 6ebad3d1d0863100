"""distres: distributed training of ResNet image classifiers.

    import distres
    summary = distres.fit(["train.max_steps=30", "run.dir=runs/try"])

runs the same run as `python -m distres.train train.max_steps=30 run.dir=runs/try`, in this
process (under torchrun it joins the process group as the CLI does), and returns the summary
that run writes to summary.json. Errors are raised (ConfigError, CheckpointError, DataError),
not turned into exit codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distres import log as _log

if TYPE_CHECKING:
    from os import PathLike

    from distres.config import Config

__all__ = ["fit"]

_log.install()


def fit(
    config: Config | list[str] | tuple[str, ...] | None = None,
    preset: str | PathLike | None = None,
) -> dict[str, Any]:
    """Train and return the run's summary. `config`: a Config, or `section.key=value`
    overrides applied over `preset` (a YAML file) or the embedded default."""
    from distres.config import Config, load_config
    from distres.trainer import run

    if not isinstance(config, Config):
        config = load_config(preset, list(config or []))
    elif preset is not None:
        raise TypeError("distres.fit: give a Config or a preset with overrides, not both")
    return run(config)
