"""The DDP engine's tensors in torch.distributed.checkpoint (DCP), read safely.

DCP's tensors are read by torch.load(weights_only=True), its non-tensor items (optimizer
hyper-parameters) through a load planner that does the same, and its `.metadata` pickle
through an unpickler that admits exactly the (module, name) pairs that file is made of.
DCP reshards on load, so a checkpoint written by N ranks loads on any other number.
"""

from __future__ import annotations

import io
import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from distres.errors import CheckpointError

# A single-process run saves and loads without a process group on purpose; DCP warns that it
# "assumes the intent" each time (also from async_save's background thread).
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes `.metadata` with pickle; admit exactly the (module, name) pairs that file is
    made of. No dotted names: pickle protocol 4 would resolve "filesystem" + "os.system"."""

    ALLOWED = frozenset(
        {
            *(
                ("torch.distributed.checkpoint.metadata", name)
                for name in (
                    "Metadata",
                    "MetadataIndex",
                    "StorageMeta",
                    "TensorProperties",
                    "TensorStorageMetadata",
                    "BytesStorageMetadata",
                    "ChunkStorageMetadata",
                    "_MEM_FORMAT_ENCODING",
                )
            ),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("collections", "OrderedDict"),
            ("torch", "Size"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "WindowsPath"),
            ("torch.serialization", "_get_layout"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        admitted = (module, name) in self.ALLOWED or (
            module == "torch"
            and name.isidentifier()
            and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not admitted:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}")
        return super().find_class(module, name)


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (an incomplete checkpoint)") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable DCP metadata ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_item(value: io.BytesIO, fqn: str) -> Any:
    """A DCP non-tensor item (optimizer hyper-parameters), read with weights_only=True."""
    try:
        return torch.load(value, weights_only=True)
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError for a damaged item
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refused the non-tensor item {fqn!r} ({first[:200]})") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, but non-tensor items (optimizer hyper-parameters) are read with
    torch.load(weights_only=True) instead of a full unpickle."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = load_item(value, read_item.dest_index.fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def save_tensors(
    tensors: dict[str, Any], directory: Path, group: Any, async_save: bool
) -> Future | None:
    """Write `tensors` (every rank its part) into directory; async: a Future that completes
    when this rank's part is on disk (the tensors are staged in host memory first)."""
    kwargs: dict[str, Any] = {"checkpoint_id": str(directory), "process_group": group}
    if not (dist.is_available() and dist.is_initialized()):
        kwargs["no_dist"] = True
    if async_save:
        future = dcp.async_save(tensors, **kwargs)
        # an AsyncSaveResponse (newer torch) or a Future
        return getattr(future, "upload_completion", future)
    dcp.save(tensors, **kwargs)
    return None


def load_tensors(path: Path, tensors: dict[str, Any]) -> None:
    """Fill `tensors` in place from checkpoint `path` (DCP reshards for any world size)."""
    kwargs = {}
    if not (dist.is_available() and dist.is_initialized()):
        kwargs["no_dist"] = True
    try:
        dcp.load(
            tensors,
            storage_reader=SafeFileSystemReader(path),
            planner=SafeLoadPlanner(),
            **kwargs,
        )
    except CheckpointException as e:
        # DCP wraps each rank's failure (ours included) with its traceback: one line instead.
        causes = [
            failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()
        ]
        ours = next((c for c in causes if isinstance(c, CheckpointError)), None)
        if ours is not None:
            raise CheckpointError(f"{path}: {ours}") from None
        first = causes[0] if causes else e
        raise CheckpointError(f"{path}: cannot load ({type(first).__name__}: {first})") from None


def validate_tensors(path: Path, meta: dict) -> None:
    """Every byte range DCP's metadata names is there, and its non-tensor items load as a
    resume would load them (before any collective load)."""
    metadata = SafeFileSystemReader(path).read_metadata()
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in need.items():
        f = path / name
        if not f.is_file() or f.stat().st_size < size:
            have = f.stat().st_size if f.is_file() else "missing"
            raise CheckpointError(f"{f}: truncated ({have} of {size} bytes)")
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                load_item(io.BytesIO(f.read(info.length)), index.fqn)


def consolidated_weights(
    path: Path, meta: dict, model: torch.nn.Module, trust: bool = False, part: str = "model"
) -> dict[str, torch.Tensor]:
    """The model's weights (part="ema": its EMA's) from a checkpoint of any world size, in
    this one process (DCP's files hold nothing to trust: `trust` changes nothing)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {part: get_model_state_dict(model)}
    load_tensors(path, state)
    return state[part]
