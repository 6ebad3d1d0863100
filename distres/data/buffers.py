"""Batch assembly and buffer lifetimes: cutting worker chunks into exact batches, reusable
host batch buffers, and device buffers handed over without a copy (the batch contract itself
is in api.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
                and unshared(buf)
            ):
                return buf.detach()
        buf = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        if len(self.buffers) < self.size:
            self.buffers.append(buf)
        # A second tensor on the same storage: the storage use count, not Python's reference
        # count, is what tells whether the caller still holds it.
        return buf.detach()


def unshared(buf: torch.Tensor) -> bool:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # private API gone: never reuse, allocate fresh each batch
        return False
    # one reference held by buf itself, one by the temporary UntypedStorage object
    return use_count(buf.untyped_storage()._cdata) == 2


def rebatch(
    chunks: Iterator[tuple], batch_size: int, drop_last: bool, pin: bool = False
) -> Iterator[tuple]:
    """Cut a stream of variable-size chunks into batches of exactly batch_size, each copied
    once into a tensor of its own. A chunk is (images, labels) or (images, labels, keys): the
    parts are cut together, tensors concatenated, lists joined.

    pin=True puts the batch in pinned memory (torch's caching host allocator), so the copy to
    the GPU is truly asynchronous: from pageable memory CUDA stages the copy and waits for the
    stream's queued kernels first, which stalls the host once per step and leaves the GPU
    idle while the next step is launched. The allocator does not hand a block out again
    until the copy that read it has finished.
    """
    held: list[tuple] = []
    count = 0
    for chunk in chunks:
        held.append(tuple(chunk))
        count += len(chunk[1])
        while count >= batch_size:
            parts, need = [], batch_size
            while need:
                first = held[0]
                if len(first[1]) <= need:
                    parts.append(held.pop(0))
                    need -= len(first[1])
                else:
                    parts.append(tuple(p[:need] for p in first))
                    held[0], need = tuple(p[need:] for p in first), 0
            count -= batch_size
            yield _join(parts, pin)
    if count and not drop_last:
        yield _join(held, pin)


def _join(parts: list[tuple], pin: bool) -> tuple:
    return tuple(
        cat_into(column, pin)
        if isinstance(column[0], torch.Tensor)
        else [item for part in column for item in part]
        for column in map(list, zip(*parts, strict=True))
    )


def cat_into(parts: list[torch.Tensor], pin: bool) -> torch.Tensor:
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    return torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin))


class HeldOutputs:
    """DALI output buffers handed to torch without a copy, kept until torch is done.

    Freeing the torch tensor (the consumer moves on) drops DALI's buffer while kernels
    torch queued may still read it, and DALI's allocator orders a reuse after its own
    stream only. So each output stays here until no tensor shares its storage any more
    (every view the consumer had is gone: grad accumulation keeps micro-batches across
    several hand-overs), then until an event recorded on torch's stream at that point has
    passed. Checked at each hand-over; nothing here blocks.
    """

    def __init__(self, event: Callable[[], object] | None = None):
        self._event = event or _stream_event
        self._items: list[list] = []  # [dali buffer, torch tensor, event or None]

    def add(self, dali_buffer: object, tensor: torch.Tensor) -> None:
        self.release_done()
        self._items.append([dali_buffer, tensor, None])

    def release_done(self) -> None:
        for item in self._items:
            if item[2] is None and unshared(item[1]):
                item[2] = self._event()  # after every kernel queued on the tensor so far
        self._items = [i for i in self._items if i[2] is None or not i[2].query()]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _stream_event():
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream())
    return event
