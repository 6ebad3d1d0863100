"""The registered variants, as data (no torch import: config validation stays instant)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one registered variant from another."""

    block: str
    layers: tuple[int, ...]
    # "imagenet": 7x7/2 conv + maxpool; "deep": three 3x3 convs (the first /2) + maxpool
    # (ResNet-C, Bag of Tricks); "cifar": 3x3/1 conv
    stem: str
    widths: tuple[int, ...]
    stem_width: int  # the stem's output channels ("deep": its first two convs' width, x2 out)
    shortcut: str  # "B": 1x1 projection where shapes change; "A": zero-pad, parameter-free
    groups: int = 1  # ResNeXt's cardinality (grouped 3x3 convs)
    width_per_group: int = 64  # bottleneck width per group at 64 planes (Wide ResNet: 128)
    avg_down: bool = False  # ResNet-D: a 2x2 average pool before the projection's 1x1 conv
    se: bool = False  # a squeeze-and-excitation gate on each block's branch (timm's SEModule)

    @property
    def depth(self) -> int:
        per_block = 3 if "bottleneck" in self.block else 2
        return per_block * sum(self.layers) + 2


_IMAGENET_WIDTHS = (64, 128, 256, 512)


def _bottleneck(layers: tuple[int, ...], stem="imagenet", stem_width=64, **kw) -> ArchSpec:
    return ArchSpec("bottleneck", layers, stem, _IMAGENET_WIDTHS, stem_width, "B", **kw)


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("basic", (2, 2, 2, 2), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
    "resnet34": ArchSpec("basic", (3, 4, 6, 3), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
    "resnet50": ArchSpec("bottleneck", (3, 4, 6, 3), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
    "resnet101": ArchSpec("bottleneck", (3, 4, 23, 3), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
    "resnet152": ArchSpec("bottleneck", (3, 8, 36, 3), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
    # torchvision's ResNeXt and Wide ResNet: the same module names, only the 3x3 conv changes
    "resnext50_32x4d": _bottleneck((3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": _bottleneck((3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_64x4d": _bottleneck((3, 4, 23, 3), groups=64, width_per_group=4),
    "wide_resnet50_2": _bottleneck((3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": _bottleneck((3, 4, 23, 3), width_per_group=128),
    # timm's: ResNet-D (deep stem of width 32, average-pool downsampling) and SE-ResNet
    "resnet50d": _bottleneck((3, 4, 6, 3), stem="deep", stem_width=32, avg_down=True),
    "seresnet50": _bottleneck((3, 4, 6, 3), se=True),
    **{
        f"resnet{6 * n + 2}": ArchSpec("basic", (n, n, n), "cifar", (16, 32, 64), 16, "A")
        for n in (3, 5, 7, 9, 18, 200)  # ResNet-20/32/44/56/110/1202
    },
    **{
        f"preact_resnet{9 * n + 2}": ArchSpec(
            "preact_bottleneck", (n, n, n), "cifar", (16, 32, 64), 16, "B"
        )
        for n in (18, 111)  # ResNet-164 / ResNet-1001
    },
}
