import re

import pytest
import timm
import torch
import torchvision

from distres.models import ARCHS, build_model
from distres.models.resnet import BasicBlock, ZeroPadShortcut, blocks_in, count_params, resnet

IMAGENET_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "resnet50d": 25_576_264,  # timm's
    "seresnet50": 28_088_024,  # timm's
}
TIMM = ("resnet50d", "seresnet50")
BIG = (
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet101_2",
)


def reference(name: str) -> torch.nn.Module:
    """The same architecture from the library distres matches it to (random weights)."""
    if name in TIMM:
        return timm.create_model(name, pretrained=False)
    return getattr(torchvision.models, name)()


# He et al. 2015 (Table 6) and 2016 ("Identity Mappings", Table 3), at 10 classes.
PAPER_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet1202": 19.4e6,
    "preact_resnet164": 1.7e6,
    "preact_resnet1001": 10.2e6,
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in IMAGENET_PARAMS]
)
def test_imagenet_variant_matches_torchvision_or_timm(name):
    torch.manual_seed(0)
    ours = resnet(name).eval()
    theirs = reference(name).eval()
    assert count_params(ours) == count_params(theirs) == IMAGENET_PARAMS[name]
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    # Give BN non-trivial running stats so the comparison covers them too.
    for k, v in ours_sd.items():
        if k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("running_mean"):
            v.normal_(0, 0.1)
    theirs.load_state_dict(ours_sd)  # strict
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    # ... and the other way round.
    ours2 = resnet(name).eval()
    if name in TIMM:  # timm zero-inits each block's last BN: make every weight count
        for v in theirs.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.01)
    ours2.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        assert torch.equal(ours2(x), theirs(x))


@pytest.mark.parametrize(
    "name,expected",
    # the big ones are counted in the comparison above (slow)
    [kv for kv in IMAGENET_PARAMS.items() if kv[0] not in BIG],
)
def test_imagenet_param_counts_exact(name, expected):
    assert count_params(resnet(name, num_classes=1000)) == expected


@pytest.mark.parametrize("name,paper", PAPER_PARAMS.items())
def test_small_image_param_counts_within_3pct_of_papers(name, paper):
    n = count_params(resnet(name, num_classes=10))
    assert abs(n - paper) / paper <= 0.03, (name, n, paper)


def test_depths_are_what_the_names_say():
    for name, spec in ARCHS.items():
        assert str(spec.depth) == re.search(r"resne(?:t|xt)(\d+)", name).group(1), name


def test_resnet1001_forward_backward_batch2():
    torch.manual_seed(0)
    model = resnet("preact_resnet1001", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    # The gradient reaches the stem through 333 blocks.
    assert model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet164"])
def test_plain_switch_removes_every_shortcut(name):
    res = resnet(name, num_classes=10)
    plain = resnet(name, num_classes=10, plain=True)
    assert all(not b.shortcut and b.downsample is None for b in blocks_in(plain))
    assert all(b.shortcut for b in blocks_in(res))
    # Only projection shortcuts carry parameters: a plain net has the same main path.
    proj = sum(
        p.numel()
        for b in blocks_in(res)
        if b.downsample is not None
        for p in b.downsample.parameters()
    )
    assert count_params(plain) == count_params(res) - proj
    # With equal main-path weights, removing the shortcut changes the function.
    plain.load_state_dict({k: v for k, v in res.state_dict().items() if "downsample" not in k})
    x = torch.randn(2, 3, 32, 32) if name != "resnet50" else torch.randn(2, 3, 64, 64)
    res.eval(), plain.eval()
    with torch.no_grad():
        assert not torch.allclose(res(x), plain(x))


def test_cifar_uses_parameter_free_option_a_shortcuts():
    model = resnet("resnet20", num_classes=10)
    shortcuts = [b.downsample for b in blocks_in(model) if b.downsample is not None]
    assert len(shortcuts) == 2 and all(isinstance(s, ZeroPadShortcut) for s in shortcuts)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet164"])
def test_zero_init_residual_makes_identity_blocks(name):
    model = resnet(name, num_classes=10, zero_init_residual=True).eval()
    for block in blocks_in(model):
        if block.downsample is None:
            x = torch.relu(torch.randn(2, block.conv1.in_channels, 8, 8))
            with torch.no_grad():
                assert torch.allclose(block(x), x), type(block).__name__
    default = resnet(name, num_classes=10)
    assert all(b.last_norm().weight.abs().sum() > 0 for b in blocks_in(default))


def test_num_classes_and_in_chans_from_config():
    from distres.config import ModelConfig

    model = build_model(ModelConfig(name="resnet32", num_classes=7, in_chans=1))
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 7)
    assert isinstance(blocks_in(model)[0], BasicBlock)


def test_channels_last_forward_keeps_memory_format():
    model = resnet("resnet20", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    feats = model.forward_features(x)
    assert feats.is_contiguous(memory_format=torch.channels_last)
