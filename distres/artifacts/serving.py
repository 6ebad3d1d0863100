"""Models for serving: ONNX (dynamic batch, opset stated), TorchScript and torch.export
programs, each with the validation preprocessing written beside it and checked against the
PyTorch model on the spot (onnxruntime for ONNX).

The exported graph takes what the model takes: float32 N x C x H x W images, normalised
((pixels / 255 - mean) / std) after the validation resize and centre crop; the preprocessing
file (`<out stem>.preprocess.json`) says exactly which, with the class names.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from distres.errors import ExportError, WriteError, why
from distres.io import write_json

FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts"), "pt2": (".pt2",)}
OPSET = 18  # onnxruntime 1.18+ runs it; torch's ONNX exporter writes 18 natively
INPUT, OUTPUT = "images", "logits"
PARITY_TOL = 1e-4  # max |difference| of the logits, relative to their largest magnitude (>= 1)


class ServingError(ExportError):
    """An export that cannot be written or does not match the model; the message says why."""


def export(
    model: nn.Module, fmt: str, out: Path, info: dict, opset: int = OPSET
) -> dict[str, object]:
    """Write `model` (eval mode, fp32, on the CPU) in `fmt` to `out`, the preprocessing beside
    it, and check the written file against the model. Returns what the check found."""
    model = model.float().eval().to("cpu", memory_format=torch.contiguous_format)
    size, chans = info["image_size"], info["in_chans"]
    example = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(0))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{out}: cannot write ({why(e)})") from None
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")  # torch.export wants its suffix
    try:
        if fmt == "onnx":
            _onnx(model, example, tmp, opset)
        elif fmt == "torchscript":
            with _quiet():  # TorchScript is deprecated in torch >= 2.9; it serves C++/Triton
                torch.jit.save(torch.jit.trace(model, example), str(tmp))
        else:
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(tmp))
    except ServingError:
        raise
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{out}: cannot write ({why(e)})") from None
    except Exception as e:  # the exporters raise many types; the first line says enough
        tmp.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ServingError(f"{fmt} export failed ({type(e).__name__}: {first})") from None
    try:
        check = parity(model, fmt, tmp, chans, size)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a file that does not match the model is not left
        raise
    try:
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{out}: cannot write ({why(e)})") from None
    write_json(preprocess_path(out), {
        **info,
        "format": fmt,
        **({"opset": opset} if fmt == "onnx" else {}),
        "input": {
            "name": INPUT,
            "shape": ["batch", chans, size, size],
            "dtype": "float32",
            "layout": "NCHW",
            "pixels": "RGB (L for in_chans 1); resize the shorter side to `resize` "
            "(bilinear, antialiased; 0: none), centre-crop `image_size`, scale to "
            "[0, 1], then (x - mean) / std per channel",
        },
        "output": {"name": OUTPUT, "shape": ["batch", len(info["classes"])]},
        "parity": check,
    }, indent=1)  # fmt: skip
    return check


def preprocess_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.preprocess.json")


def _onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ServingError(
            "--format onnx needs onnx and onnxscript: pip install 'distres[onnx]'"
        ) from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        program.save(str(path))


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines and deprecation warnings are not the user's business;
    an error still propagates."""
    import io

    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def parity(model: nn.Module, fmt: str, path: Path, chans: int, size: int) -> dict[str, object]:
    """The written model's outputs against the PyTorch model's on batches of 1 and 3 (neither
    the traced batch of 2: the batch dimension is dynamic); ServingError past PARITY_TOL."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, chans, size, size, generator=g) for n in (1, 3)]
    with torch.no_grad():
        expected = [model(x) for x in batches]
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return {"checked": False, "why": "onnxruntime is not installed"}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = [torch.from_numpy(session.run(None, {INPUT: x.numpy()})[0]) for x in batches]
        runner = f"onnxruntime {ort.__version__}"
    elif fmt == "torchscript":
        with _quiet(), torch.no_grad():
            loaded = torch.jit.load(str(path))
            got = [loaded(x) for x in batches]
        runner = "torch.jit.load"
    else:
        with torch.no_grad():
            loaded = torch.export.load(str(path)).module()
            got = [loaded(x) for x in batches]
        runner = "torch.export.load"
    diff = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
    scale = max(1.0, max(float(b.abs().max()) for b in expected))
    check = {"checked": True, "runner": runner, "max_abs_diff": diff, "tolerance": PARITY_TOL}
    if diff > PARITY_TOL * scale:
        raise ServingError(
            f"{fmt}: outputs differ from the PyTorch model's by {diff:.3g} (> {PARITY_TOL} x "
            f"{scale:.3g}) under {runner}"
        )
    return check
