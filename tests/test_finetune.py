"""Fine-tuning: model.init_from (files of torchvision, timm and distres), model.freeze and
optim.head_lr_mult."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import timm
import torch
import torchvision
from commands import run_cli
from safetensors.torch import load_file, save_file

from distres.config import load_config, plan_batch
from distres.dist import DistEnv
from distres.engine import build_engine
from distres.errors import WeightsError
from distres.models import build_model
from distres.models.pretrained import init_from, read_weights
from distres.models.resnet import resnet


@pytest.mark.parametrize("name", ["resnet50d", "seresnet50"])
def test_timm_state_dicts_load_with_equal_outputs(tmp_path, name):
    """A timm model's weights, as timm's train.py saves them (wrapped, DDP-prefixed), and as
    safetensors: the distres model gives timm's outputs."""
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, num_classes=7).eval()
    with torch.no_grad():  # timm zero-inits each block's last BN: make every tensor count
        for v in theirs.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.02)
    wrapped = {
        "epoch": 3,
        "arch": name,
        "state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()},
    }
    torch.save(wrapped, tmp_path / "timm.pth.tar.pth")
    save_file(theirs.state_dict(), tmp_path / "timm.safetensors")
    x = torch.randn(2, 3, 64, 64)
    for f in ("timm.pth.tar.pth", "timm.safetensors"):
        ours = resnet(name, num_classes=7)
        init_from(ours, tmp_path / f)
        with torch.no_grad():
            assert torch.equal(ours.eval()(x), theirs(x)), f


def test_a_head_of_another_size_is_reinitialised_with_one_line(tmp_path, capfd):
    torch.manual_seed(0)
    source = torchvision.models.resnet18()  # 1000 classes
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    torch.manual_seed(1)
    model = resnet("resnet18", num_classes=10)
    fresh_fc = model.fc.weight.detach().clone()
    capfd.readouterr()
    init_from(model, tmp_path / "tv.pth")
    (line,) = capfd.readouterr().err.splitlines()
    assert "(1000, 512)" in line and "(10, 512)" in line and "re-initialised" in line
    assert torch.equal(model.fc.weight, fresh_fc)  # left as built
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.state_dict()[k], v), k


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/distres-init-from-pwned"


@pytest.mark.parametrize(
    "make,expected",
    [
        # resnet18's file into resnet34: its layers' later blocks are missing
        (
            lambda p: torch.save(resnet("resnet18").state_dict(), p / "w.pth"),
            "missing 80 key(s) of this model: layer1.2.conv1.weight",
        ),
        (
            lambda p: torch.save(
                {**resnet("resnet34").state_dict(), "extra.w": torch.ones(1)}, p / "w.pth"
            ),
            "1 unexpected key(s): extra.w",
        ),
        (
            lambda p: torch.save(resnet("resnet34", in_chans=1).state_dict(), p / "w.pth"),
            "conv1.weight (64, 1, 7, 7) vs (64, 3, 7, 7)",
        ),
        (lambda p: (p / "w.pth").write_bytes(pickle.dumps({"w": _Payload()})), "weights only"),
        (lambda p: (p / "w.pth").write_bytes(b"\x00garbage"), "weights only"),
        (lambda p: torch.save({"epoch": 3, "opt": {}}, p / "w.pth"), "no state dict of tensors"),
        (lambda p: (p / "w.safetensors").write_bytes(b"garbage"), "not a safetensors file"),
        (lambda p: (p / "w.onnx").write_bytes(b"x"), "expected a .safetensors"),
        (lambda p: (p / "w").mkdir(), "neither a final/ directory"),
        (lambda p: None, "no such file"),
    ],
)
def test_init_from_problems_are_one_line_errors_naming_the_file(tmp_path, make, expected):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    make(tmp_path)
    found = sorted(tmp_path.iterdir())
    path = found[0] if found else tmp_path / "absent.pth"
    with pytest.raises(WeightsError) as e:
        init_from(resnet("resnet34"), path)
    message = str(e.value)
    assert message.startswith(f"model.init_from={path}") and "\n" not in message
    assert expected in message, message
    assert not os.path.exists(MARKER)  # nothing in the file ran


def _engine(overrides: list[str]):
    cfg = load_config(None, ["run.device=cpu", *overrides])
    return cfg, build_engine(cfg, DistEnv(), torch.device("cpu"), plan_batch(cfg, 1), 10)


def test_freeze_keeps_parts_and_their_bn_statistics_and_head_lr_mult_holds_its_ratio():
    _, engine = _engine(
        [
            "model.freeze=[stem,layer1]",
            "optim.head_lr_mult=10",
            "optim.warmup_epochs=0.5",
            "train.batch_size=8",
        ]
    )
    model = engine.module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine.train()
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training
    head = {id(p) for p in model.fc.parameters()}
    groups = engine.optimizer.param_groups
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert not any(id(p) == id(model.conv1.weight) for g in groups for p in g["params"])
    torch.manual_seed(0)
    for _ in range(6):
        images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        engine.train_step([(images, torch.randint(0, 10, (8,)))])
        lrs = {any(id(p) in head for p in g["params"]): g["lr"] for g in groups}
        assert lrs[True] == pytest.approx(10 * lrs[False]) and lrs[False] > 0
    after = model.state_dict()
    for k, v in before.items():
        frozen = k.startswith(("conv1.", "bn1.", "layer1."))
        assert torch.equal(after[k], v) == frozen, k


@pytest.mark.slow
def test_init_from_a_distres_run_and_a_resume_that_does_not_read_it(tmp_path):
    """A distres final/ directory and a checkpoint directory give the same weights; a run
    initialised from one resumes from its own checkpoint, not model.init_from (gone by then)."""
    source = tmp_path / "source"
    result = run_cli("train.max_steps=3", f"run.dir={source}", "tracking.progress=off")
    assert result.returncode == 0, result.stderr
    final = load_file(source / "final" / "model.safetensors")
    for path in (source / "final", source / "checkpoints"):
        weights = read_weights(path)
        assert weights.keys() == final.keys()
        assert all(torch.equal(weights[k], final[k]) for k in final), path
    args = [f"model.init_from={source / 'final'}", f"run.dir={tmp_path / 'run'}", "train.epochs=2"]
    first = run_cli(*args, "train.max_steps=2", "tracking.progress=off")
    assert first.returncode == 0, first.stderr
    assert "loaded 116 tensors, the head included" in first.stderr
    shutil.rmtree(source)
    second = run_cli(*args, "train.max_steps=4", "tracking.progress=off")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "model.init_from" not in second.stderr


@pytest.mark.slow
def test_fine_tuning_a_torchvision_resnet18_on_digits(tmp_path):
    """A torchvision resnet18 state dict (made here: no download) with a 10-class head trains
    on digits, stem to layer3 frozen: they leave with the source's weights and batch-norm
    statistics, while layer4 and the head learn."""
    torch.manual_seed(0)
    source = torchvision.models.resnet18().state_dict()
    torch.save(source, tmp_path / "resnet18.pth")
    run = run_cli(
        "model.name=resnet18",
        f"model.init_from={tmp_path / 'resnet18.pth'}",
        "model.freeze=[stem,layer1,layer2,layer3]",
        "optim.lr=0.05",
        "optim.head_lr_mult=2",
        "optim.warmup_epochs=0",
        "train.epochs=1",
        "data.image_size=64",
        "data.random_resized_crop=true",
        "data.rrc_min_scale=0.35",
        "data.val_resize=64",
        f"run.dir={tmp_path / 'run'}",
        "tracking.progress=off",
    )
    assert run.returncode == 0, run.stderr
    assert "(1000, 512), this model's (10, 512): the head is re-initialised" in run.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(f"fine-tuned head: val top-1 {summary['final_val_top1']:.4f}")
    # One epoch of layer4 and the head over a frozen, randomly initialised torchvision
    # ResNet-18: it learns, well above chance (0.1). Measured 0.61 (the test's author's CPU)
    # and 0.54 (2-core Intel Xeon, AVX-512): CPUs differ by several points here; 0.3 is
    # three times chance and below the lower by 0.24.
    assert summary["final_val_top1"] >= 0.3, summary
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert final["fc.weight"].shape == (10, 512)
    for k, v in source.items():
        if k.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")):
            assert torch.equal(final[k], v), k
    assert not torch.equal(final["layer4.0.conv1.weight"], source["layer4.0.conv1.weight"])
    assert not torch.equal(final["layer4.0.bn1.running_mean"], source["layer4.0.bn1.running_mean"])


def test_build_model_alone_ignores_init_from():
    """Evaluation, export and predict rebuild the model from its config: no file is read."""
    cfg = load_config(None, ["model.init_from=/nonexistent.pth"])
    assert build_model(cfg.model) is not None
