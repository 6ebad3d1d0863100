"""Precision in one place: the autocast dtype a config asks for, and the context that applies
it. Engines, loaders (DALI emits half-precision input on a GPU) and evaluation all use it."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32 ("auto": bf16 on a GPU, fp32 on the CPU)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def input_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """What every loader emits (DALI, the torch backend's CPU path and its GPU-decode stage)
    and benchmarks feed: the autocast dtype on a GPU, so the first convolution takes the
    batch as it is and half the bytes are written; fp32 otherwise."""
    return dtype if device.type == "cuda" and dtype is not None else torch.float32


def set_tf32(device: torch.device, tf32: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on a GPU (train.tf32): one switch, set the same
    way by the trainer and the benchmarks (timm and torchvision's references turn it on)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
