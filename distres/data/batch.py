"""The batch contract every input backend honours."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    images: torch.Tensor
    """N x C x H x W float on the model's device, channels_last strides when asked for."""
    labels: torch.Tensor
    """N int64 class indices on the model's device."""
