"""Reusable host batch buffers (the batch contract itself is in api.py)."""

from __future__ import annotations

import torch


class BufferPool:
    """Host batch buffers, reused once nothing outside the pool references them.

    A fresh 38 MB float batch (64x3x224x224) costs more than filling it: glibc serves blocks
    that large by mmap and unmaps them on free, so every batch page-faults its memory in
    again. A buffer is handed out again only when no tensor (the batch, a view or slice of
    it) still shares its storage, so a batch the caller keeps (grad accumulation, a saved
    reference) is never overwritten.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self.buffers: list[torch.Tensor] = []

    def take(self, shape, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
        for buf in self.buffers:
            if (
                buf.shape == shape
                and buf.dtype == dtype
                and buf.is_contiguous(memory_format=memory_format)
                and _unshared(buf)
            ):
                return buf.detach()
        buf = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        if len(self.buffers) < self.size:
            self.buffers.append(buf)
        # A second tensor on the same storage: the storage use count, not Python's reference
        # count, is what tells whether the caller still holds it.
        return buf.detach()


def _unshared(buf: torch.Tensor) -> bool:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # private API gone: never reuse, allocate fresh each batch
        return False
    # one reference held by buf itself, one by the temporary UntypedStorage object
    return use_count(buf.untyped_storage()._cdata) == 2
