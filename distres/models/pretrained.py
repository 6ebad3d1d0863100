"""Fine-tuning: weights from another run or another library into a freshly built model.

`model.init_from` names a .safetensors file, a `.pth`/`.pt`/`.bin` state dict (read with
torch.load(weights_only=True): nothing but tensors and plain containers is unpickled), a
distres `final/` directory or a distres checkpoint (consolidated from any world size). The
registered variants carry torchvision's and timm's own module names, so their files load as
they are; wrappers are unwrapped (timm's and torchvision's training checkpoints keep the
weights under "state_dict" / "model") and DDP's / torch.compile's prefixes dropped.

A head of another shape (another number of classes) is left at its fresh initialisation, with
one line saying so. Anything else that does not fit is a one-line WeightsError naming the file
and the first few keys.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from distres.errors import WeightsError

log = logging.getLogger("distres")

HEAD = ("fc.weight", "fc.bias")
# where training checkpoints keep the weights: timm ("state_dict"), torchvision's references
# ("model"), Lightning-style and others; the first that holds tensors is used
WRAPPERS = ("state_dict", "model", "module", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SHOWN = 4  # keys named in an error


def _first(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _unwrap(obj: object, where: str) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"state_dict": {"model": {...}}}
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj, dict) and k in obj), None)
        if not isinstance(inner, dict):
            kind = (
                f"a mapping of {_first(sorted(map(str, obj)))}"
                if isinstance(obj, dict)
                else type(obj).__name__
            )
            raise WeightsError(f"model.init_from={where}: no state dict of tensors in it ({kind})")
        obj = inner
    else:
        raise WeightsError(f"model.init_from={where}: no state dict of tensors in it")
    state = {}
    for key, value in obj.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict a `model.init_from` path names (see the module's doc), on the CPU."""
    from distres.artifacts.final import WEIGHTS

    p = Path(path)
    if not p.exists():
        raise WeightsError(f"model.init_from={path}: no such file or directory")
    if p.is_dir():
        if (p / WEIGHTS).is_file():
            p = p / WEIGHTS
        else:
            from distres.artifacts.consolidate import checkpoint_weights
            from distres.checkpoint import CheckpointError

            try:
                weights, _, _ = checkpoint_weights(p)
            except CheckpointError as e:
                raise WeightsError(
                    f"model.init_from={path}: neither a final/ directory ({WEIGHTS}) nor a "
                    f"distres checkpoint ({e})"
                ) from None
            return _unwrap(weights, str(path))
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(p), device="cpu"), str(path))
        except WeightsError:
            raise
        except Exception as e:  # SafetensorError, OSError
            raise WeightsError(f"model.init_from={path}: not a safetensors file ({e})") from None
    if p.suffix in STATE_DICT_SUFFIXES:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            first = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)
            raise WeightsError(
                f"model.init_from={path}: not loadable as weights only ({first.strip()[:160]}); "
                "save the model's state_dict() (or a .safetensors file) instead"
            ) from None
        return _unwrap(obj, str(path))
    raise WeightsError(
        f"model.init_from={path}: expected a .safetensors file, a state dict "
        f"({'/'.join(STATE_DICT_SUFFIXES)}), or a distres final/ or checkpoint directory"
    )


def init_from(model: nn.Module, path: str | Path) -> None:
    """Load `path`'s weights into `model` (see the module's doc); logs one line."""
    state = read_weights(path)
    own = model.state_dict()
    head = [k for k in HEAD if k in state and k in own and state[k].shape != own[k].shape]
    if head:
        theirs, ours = state["fc.weight"].shape, own["fc.weight"].shape
        for k in head:
            del state[k]
    # BN's step counter is bookkeeping that older files lack; everything else must be there
    missing = [k for k in own if k not in state and k not in head]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing:
        raise WeightsError(
            f"model.init_from={path}: missing {len(missing)} key(s) of this model: "
            f"{_first(missing)} (written for another model.name?)"
        )
    if unexpected:
        raise WeightsError(
            f"model.init_from={path}: {len(unexpected)} unexpected key(s): {_first(unexpected)}"
        )
    if wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
        raise WeightsError(
            f"model.init_from={path}: {len(wrong)} tensor(s) of another shape: {_first(shapes)}"
        )
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))
    if head:
        log.info(
            f"model.init_from={path}: loaded {len(state)} tensors; its head fc has shape "
            f"{tuple(theirs)}, this model's {tuple(ours)}: the head is re-initialised"
        )
    else:
        log.info(f"model.init_from={path}: loaded {len(state)} tensors, the head included")
