"""What every config section shares: the error type, the field doc, the value checks."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from distres.errors import ConfigError


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
