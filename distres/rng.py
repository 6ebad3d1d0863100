"""Every RNG a rank draws from, as JSON (for checkpoints), and a check of such a state."""

from __future__ import annotations

import base64
import random

import numpy as np
import torch


def rng_state(device: torch.device) -> dict:
    """Python's, NumPy's and torch's (CPU, and CUDA on a GPU) generator states as JSON."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
    }
    if device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)


def rng_problem(state: object) -> str | None:
    """Why `state` would not restore (tried on throwaway generators), or None."""
    try:
        version, words, gauss = state["python"]
        random.Random().setstate((version, tuple(words), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.RandomState().set_state(
            (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
        )
        torch.Generator().set_state(_unb64(state["torch"]))
        if "cuda" in state:
            _unb64(state["cuda"])
    except Exception as e:  # any malformed part: TypeError, ValueError, KeyError, binascii...
        return f"RNG state does not restore ({type(e).__name__}: {str(e)[:100]})"
    return None


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)
