"""The ResNet family, defined by data.

Three families share one class:

- ImageNet ResNet-18/34/50/101/152 (He et al. 2015, "v1.5": stride on the 3x3 conv). Module
  names, state_dict keys, shapes, init and forward are torchvision's, so weights move both ways.
- CIFAR-style ResNet-20/32/44/56/110/1202 (He et al. 2015, section 4.2): 3x3 stem, three
  stages of 16/32/64 channels, option-A (parameter-free) shortcuts as in the paper.
- ResNeXt-50/101 and Wide ResNet-50/101 (torchvision's names: only the 3x3 conv's groups and
  width change), ResNet-D (timm's resnet50d: deep stem, average-pool downsampling) and
  SE-ResNet (timm's seresnet50: an SE gate on each branch), each loading the other library's
  weights as they are.
- Pre-activation bottleneck ResNet-164/1001 (He et al. 2016, "Identity Mappings"): the 1000+
  layer nets whose training the tutorial promises.

`plain=True` removes every shortcut (the degradation experiment); `zero_init_residual=True`
zero-inits the last BN of each residual branch (or the last conv, for pre-activation blocks,
which end in a conv) so each block starts as the identity (Goyal et al. 2017).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distres.models.archs import ARCHS, ArchSpec


def drop_branch(block: nn.Module, out: Tensor) -> Tensor:
    """Stochastic depth (Huang et al. 2016; timm's drop_path): in training, drop a block's
    residual branch for a random subset of the samples and scale the survivors by
    1 / (1 - p); the identity in evaluation. No parameters: weights load either way.

    torchvision.ops.stochastic_depth(mode="row") written out: importing torchvision costs a
    DALI run 2-3 s per rank at start-up (distres.data.build)."""
    if block.drop_path and block.training:
        keep = 1.0 - block.drop_path
        shape = (out.shape[0],) + (1,) * (out.dim() - 1)
        mask = torch.empty(shape, dtype=out.dtype, device=out.device).bernoulli_(keep)
        return out * mask.div_(keep)
    return out


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2015): subsample spatially, zero-pad the new channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        lo = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))


class BasicBlock(nn.Module):
    expansion = 1
    drop_path = 0.0  # set per block by ResNet (model.drop_path_rate)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        shortcut: bool = True,
    ):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.shortcut = shortcut

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = drop_branch(self, self.bn2(self.conv2(out)))
        if self.shortcut:
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) with timm's SEModule names and sizes: a gate per
    channel from the globally pooled features, reduced 16x (rounded to a multiple of 8)."""

    def __init__(self, channels: int):
        super().__init__()
        reduced = max(8, int(channels / 16 + 4) // 8 * 8)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.bn = nn.Identity()  # timm's slot for an optional norm (no parameters)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * gate.sigmoid()


class Bottleneck(nn.Module):
    expansion = 4
    drop_path = 0.0

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        shortcut: bool = True,
        groups: int = 1,
        width_per_group: int = 64,
        se: bool = False,
    ):
        super().__init__()
        # torchvision's width rule: ResNeXt widens the grouped 3x3, Wide ResNet doubles it
        width = int(planes * (width_per_group / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.se = SqueezeExcite(planes * self.expansion) if se else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.shortcut = shortcut

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        out = drop_branch(self, out)
        if self.shortcut:
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv ordering; the shortcut stays a clean identity path (He et al. 2016)."""

    expansion = 4
    drop_path = 0.0

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        shortcut: bool = True,
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.shortcut = shortcut

    def last_norm(self) -> nn.Module:
        # NOTE: a pre-activation branch ends in a conv, so zeroing that conv makes the block
        # the identity at init (timm does the same for its PreAct blocks).
        return self.conv3

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        # The projection (when shapes change) sees the pre-activated input, as in the paper's
        # reference code; an identity shortcut sees the raw input.
        identity = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = drop_branch(self, self.conv3(self.relu(self.bn3(out))))
        if self.shortcut:
            out = out + identity
        return out


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact_bottleneck": PreActBottleneck}
BLOCKS_TUPLE = tuple(BLOCKS.values())


class ResNet(nn.Module):
    """One class for every variant; see ARCHS for the registrations."""

    def __init__(
        self,
        spec: ArchSpec,
        num_classes: int = 1000,
        in_chans: int = 3,
        plain: bool = False,
        zero_init_residual: bool = False,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.spec = spec
        block = BLOCKS[spec.block]
        self.preact = block is PreActBottleneck
        self.plain = plain
        self.inplanes = spec.stem_width
        if spec.stem == "deep":
            # timm's deep stem (ResNet-C): its Sequential indices are the state_dict's names
            w = spec.stem_width
            self.inplanes = 2 * w
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, w, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                conv3x3(w, w),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                conv3x3(w, self.inplanes),
            )
        if spec.stem in ("imagenet", "deep"):
            if spec.stem == "imagenet":
                self.conv1 = nn.Conv2d(in_chans, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_chans, self.inplanes)
            # A pre-activation net normalises at the start of each block instead.
            self.bn1 = nn.Identity() if self.preact else nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.Identity()
        for i, (width, blocks) in enumerate(zip(spec.widths, spec.layers, strict=True)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(block, width, blocks, stride))
        final = spec.widths[-1] * block.expansion
        # Pre-activation nets end with the BN-ReLU their last block did not apply.
        self.final_norm = nn.BatchNorm2d(final) if self.preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(final, num_classes)
        self.num_stages = len(spec.layers)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BLOCKS_TUPLE):
                    nn.init.zeros_(m.last_norm().weight)
        # stochastic depth rising linearly from 0 at the first block to drop_path_rate at the
        # last (timm's ResNet; Huang et al. 2016's linear decay of survival)
        blocks = blocks_in(self)
        for i, m in enumerate(blocks):
            m.drop_path = drop_path_rate * i / max(1, len(blocks) - 1)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int):
        out_planes = planes * block.expansion
        downsample = None
        if not self.plain and (stride != 1 or self.inplanes != out_planes):
            if self.spec.shortcut == "A":
                downsample = ZeroPadShortcut(self.inplanes, out_planes, stride)
            elif self.preact:
                downsample = conv1x1(self.inplanes, out_planes, stride)
            elif self.spec.avg_down:
                # ResNet-D: average, then project (timm's downsample_avg and its indices)
                pool = (
                    nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                    if stride > 1
                    else nn.Identity()
                )
                downsample = nn.Sequential(
                    pool, conv1x1(self.inplanes, out_planes), nn.BatchNorm2d(out_planes)
                )
            else:
                downsample = nn.Sequential(
                    conv1x1(self.inplanes, out_planes, stride), nn.BatchNorm2d(out_planes)
                )
        spec, extra = self.spec, {}
        if block is Bottleneck:
            extra = dict(groups=spec.groups, width_per_group=spec.width_per_group, se=spec.se)
        layers = [block(self.inplanes, planes, stride, downsample, not self.plain, **extra)]
        self.inplanes = out_planes
        layers += [
            block(self.inplanes, planes, shortcut=not self.plain, **extra) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    frozen: tuple[str, ...] = ()

    def part(self, name: str) -> list[nn.Module]:
        """The modules of one part (model.freeze's names): stem, layer1..layerN, fc."""
        if name == "stem":
            return [self.conv1, self.bn1]
        return [getattr(self, name)]

    def freeze(self, parts: Sequence[str]) -> None:
        """Fine-tuning: `parts` get no gradient, and their batch norms stay in eval mode
        (their running statistics are the pretrained ones), whatever train() is called."""
        self.frozen = tuple(parts)
        for name in self.frozen:
            for m in self.part(name):
                m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        for name in self.frozen:
            for m in self.part(name):
                m.eval()
                for sub in m.modules():
                    # distres.dist.average_buffers leaves these alone (an average over ranks of
                    # equal values can move them by an ulp); marked here, so modules swapped in
                    # later (SyncBatchNorm) are marked too
                    sub.frozen_stats = True
        return self

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def set_grad_checkpointing(self, group: int | None) -> None:
        """Activation checkpointing (timm's name): keep only each group's input in training
        and recompute the rest in backward. group=None turns it off; 0 makes each residual
        stage one group; N>0 makes groups of N blocks within a stage.

        NOTE: the recomputed forward runs BatchNorm in training mode again, so each running
        statistic takes its momentum step twice per micro-batch (as with timm's
        checkpoint_seq); batch statistics, hence the gradients, are unchanged.
        """
        self.grad_ckpt_group = group

    grad_ckpt_group: int | None = None

    def _run_stage(self, stage: nn.Sequential, x: Tensor) -> Tensor:
        group = self.grad_ckpt_group
        if group is None or not (self.training and torch.is_grad_enabled()):
            return stage(x)
        blocks = list(stage)
        size = len(blocks) if group == 0 else group
        for i in range(0, len(blocks), size):
            chunk = nn.Sequential(*blocks[i : i + size])
            x = checkpoint(chunk, x, use_reentrant=False)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if not self.preact:
            x = self.maxpool(self.relu(self.bn1(x)))
        for stage in self.stages():
            x = self._run_stage(stage, x)
        if self.preact:
            x = self.relu(self.final_norm(x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def resnet(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    plain: bool = False,
    zero_init_residual: bool = False,
    drop_path_rate: float = 0.0,
) -> ResNet:
    """Build a registered variant by name, e.g. ``resnet("resnet50")``."""
    if name not in ARCHS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(ARCHS)}")
    return ResNet(ARCHS[name], num_classes, in_chans, plain, zero_init_residual, drop_path_rate)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def blocks_in(model: nn.Module) -> Sequence[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BLOCKS_TUPLE)]
