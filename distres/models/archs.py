"""The registered variants, as data (no torch import: config validation stays instant)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one registered variant from another."""

    block: str
    layers: tuple[int, ...]
    stem: str  # "imagenet": 7x7/2 conv + maxpool; "cifar": 3x3/1 conv
    widths: tuple[int, ...]
    stem_width: int
    shortcut: str  # "B": 1x1 projection where shapes change; "A": zero-pad, parameter-free

    @property
    def depth(self) -> int:
        per_block = 3 if "bottleneck" in self.block else 2
        return per_block * sum(self.layers) + 2


_IMAGENET_WIDTHS = (64, 128, 256, 512)
ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("basic", (2, 2, 2, 2), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
    "resnet34": ArchSpec("basic", (3, 4, 6, 3), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
    "resnet50": ArchSpec("bottleneck", (3, 4, 6, 3), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
    "resnet101": ArchSpec("bottleneck", (3, 4, 23, 3), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
    "resnet152": ArchSpec("bottleneck", (3, 8, 36, 3), "imagenet", _IMAGENET_WIDTHS, 64, "B"),
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
