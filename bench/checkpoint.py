"""How long a checkpoint holds up training: ResNet-50's model and SGD-momentum state.

    python3 bench/checkpoint.py [--model resnet50] [--repeats 3] [--dir /tmp]

Times distres.checkpoint.CheckpointStore writing DCP tensors as the training loop does, in
one process:

  sync save    the loop stalls for the whole write and commit
  async save   the loop stalls only while the tensors are staged into host memory; the write
               goes on in a background thread (its total time is printed too)
  load         find + validate + DCP load + set_state_dict, as a resume does

--dir picks the filesystem (the default is a temporary directory under /tmp).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distres import checkpoint as ckpt
from distres.checkpoint import dcp
from distres.config import ModelConfig
from distres.models import build_model


def make_state(name: str):
    model = build_model(ModelConfig(name=name, num_classes=1000))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    opt.step()  # momentum buffers exist: the optimizer state is as large as the model
    return model, opt


def tensors_of(model, opt) -> dict:
    model_state, optim_state = get_state_dict(model, opt)
    return {"model": model_state, "optim": optim_state}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    model, opt = make_state(args.model)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    n_bytes += sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    results: dict[str, list[float]] = {"sync": [], "async": [], "async_total": [], "load": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mode in ("sync", "async"):
            writer = ckpt.CheckpointStore(
                Path(tmp) / mode,
                rank=0,
                world_size=1,
                keep_last=2,
                keep_best=False,
                mode="max",
                async_save=mode == "async",
            )
            for step in range(1, args.repeats + 1):
                t0 = time.perf_counter()
                tensors = tensors_of(model, opt)
                writer.save(
                    step,
                    {"tensors": {"format": "dcp"}},
                    {},
                    None,
                    write=lambda d, t=tensors, a=mode == "async": dcp.save_tensors(t, d, None, a),
                )
                results[mode].append(time.perf_counter() - t0)
                if mode == "async":
                    writer.wait()  # the background write, finished and committed
                    results["async_total"].append(time.perf_counter() - t0)
            writer.close()
        newest = ckpt.committed(Path(tmp) / "sync")[0]
        size = sum(f.stat().st_size for f in newest.iterdir())
        for _ in range(args.repeats):
            fresh, fresh_opt = make_state(args.model)
            t0 = time.perf_counter()
            path = ckpt.committed(Path(tmp) / "sync")[0]
            state = tensors_of(fresh, fresh_opt)
            dcp.load_tensors(path, state)
            set_state_dict(
                fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
            results["load"].append(time.perf_counter() - t0)
        for k, v in model.state_dict().items():
            assert torch.equal(v, fresh.state_dict()[k]), k
    print(
        f"{args.model}: model + SGD momentum = {n_bytes / 2**20:.0f} MiB in memory, "
        f"{size / 2**20:.0f} MiB per checkpoint on disk; median of {args.repeats}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(f"{'what':34s} {'seconds':>8s}")
    rows = [
        ("training stalls, synchronous save", "sync"),
        ("training stalls, async save", "async"),
        ("  async write until committed", "async_total"),
        ("load (validate + read + apply)", "load"),
    ]
    for label, key in rows:
        print(f"{label:34s} {statistics.median(results[key]):8.3f}")


if __name__ == "__main__":
    main()
