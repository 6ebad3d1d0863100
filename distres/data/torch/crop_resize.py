"""One batched crop + resize + flip + normalise over images of different sizes: the
GPU-decode stage's augmentation kernel (data/torch/gpu_decode.py), on any device.

Each sample's geometry says, per axis, which source region is resized to which length and
which window of that is kept (see `Geometry`). A separable resize is two matrix products,
out = Wy @ image @ Wx^T, with Wy and Wx built from the geometry using the antialiased
bilinear filter of torch's interpolate(antialias=True) and PIL (a triangle widened by the
downscale factor, normalised over its taps), so the pixels agree with the CPU path's
torchvision v2 transforms to rounding. A flip is the reversed Wx; padding (RandomCrop,
CenterCrop on a small image) is taps that fall outside the image, which read zeros.

The images of a batch differ in size, so each sub-batch is gathered into a zero canvas as
large as its largest needed region (only the region the filter reads, not the whole image),
in one index_select from the images laid end to end (padding reads a zero sentinel): no
launch per image. Sub-batches are formed by region area under a memory budget, so one
4000-pixel image does not blow up the canvas of 255 small ones. The canvas is laid out
(n, h, C, w), so each axis's pass is one batched matmul with no broadcast copy.
"""

from __future__ import annotations

import numpy as np
import torch

# Per sample, float64: for y then x, (start, length, resized, offset, out): the source region
# [start, start + length) is resized to `resized` samples, of which [offset, offset + out) is
# kept; then flip (1.0: mirror x). start may be negative and the region may overhang the
# image: that part reads zeros (padding).
Y, X, FLIP, GEOMETRY = 0, 5, 10, 11

CANVAS_BUDGET = 1 << 26  # float32 canvas elements per sub-batch (256 MiB)


def _taps(start, length, resized, offset, i):
    """For output index i (region coordinates), the first and one-past-last region sample
    the filter reads, its centre and its support; the arithmetic of torch's
    _compute_indices_min_size_weights_aa (align_corners=False). Works on host and device
    tensors alike, so the canvas extents drawn on the host match the device's weights."""
    scale = length / resized
    support = scale.clamp(min=1.0)
    center = scale * (i + offset + 0.5)
    lo = (center - support + 0.5).trunc().clamp(min=0)
    hi = torch.minimum((center + support + 0.5).trunc(), length)
    return lo, hi, center, support


def extents(geom: torch.Tensor, axis: int, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[first, last) source index each sample's output reads along `axis` (Y or X),
    clipped to the image (`size`: its height or width)."""
    start, length, resized, offset, out = geom[:, axis : axis + 5].unbind(1)
    lo, _, _, _ = _taps(start, length, resized, offset, torch.zeros_like(start))
    _, hi, _, _ = _taps(start, length, resized, offset, out - 1)
    first = (start + lo).clamp(min=0).minimum(size)
    last = (start + hi).minimum(size).maximum(first)
    return first.long(), last.long()


def axis_weights(
    geom: torch.Tensor,
    axis: int,
    size: torch.Tensor,
    first: torch.Tensor,
    canvas: int,
    n_out: int,
    ntaps: int,
) -> torch.Tensor:
    """(n, n_out, canvas) float32 weights: output index -> canvas index, where canvas index
    c is source index first + c. `geom`, `size` and `first` live on the target device;
    n_out and ntaps come from the host (`max_taps`), so building them never syncs."""
    start, length, resized, offset, _ = geom[:, axis : axis + 5].unbind(1)
    i = torch.arange(n_out, device=geom.device, dtype=geom.dtype).expand(len(geom), n_out)
    col = lambda t: t[:, None]  # noqa: E731
    lo, hi, center, support = _taps(col(start), col(length), col(resized), col(offset), i)
    pos = lo[..., None] + torch.arange(ntaps, device=geom.device, dtype=geom.dtype)
    w = (1 - ((pos - center[..., None] + 0.5) / support[..., None]).abs()).clamp(min=0)
    w = w * (pos < hi[..., None])
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    src = start[:, None, None] + pos
    idx = src - first[:, None, None]
    inside = (src >= 0) & (src < size[:, None, None]) & (idx < canvas)
    weights = torch.zeros(len(geom), n_out, canvas, device=geom.device, dtype=torch.float32)
    weights.scatter_add_(2, idx.clamp(0, canvas - 1).long(), (w * inside).float())
    return weights


def max_taps(geom: torch.Tensor, axis: int) -> int:
    """Taps per output sample along `axis` (from the host geometry): 2 * support + 3
    covers every window the truncations in `_taps` can give."""
    scale = (geom[:, axis + 1] / geom[:, axis + 2]).max().item()
    return 2 * int(max(scale, 1.0)) + 3


def crop_resize(
    images: list[torch.Tensor],
    geom: torch.Tensor,
    out: torch.Tensor,
    inv_std: torch.Tensor | None,
    bias: torch.Tensor | None,
    budget: int = CANVAS_BUDGET,
) -> None:
    """Write each image's crop, resize, flip and normalisation into out[i].

    images: C x H x W uint8 tensors on out's device; geom: n x GEOMETRY float64 on the host;
    out: n x C x oh x ow (any strides, e.g. a channels_last view), any float dtype, or uint8
    with inv_std and bias None (the rounded pixels, for operators that follow on uint8).
    """
    n, channels = len(images), out.shape[1]
    device = out.device
    sizes = np.array([im.shape[-2:] for im in images], dtype=np.int64).reshape(n, 2)
    planes = sizes[:, 0] * sizes[:, 1]
    # the images end to end, then one zero that padding taps read
    flat = torch.cat([*(im.reshape(-1) for im in images), images[0].new_zeros(1)])
    starts = np.concatenate([[0], np.cumsum(planes * channels)[:-1]])
    host_sizes = torch.from_numpy(sizes).double()
    y0, y1 = (t.numpy() for t in extents(geom, Y, host_sizes[:, 0]))
    x0, x1 = (t.numpy() for t in extents(geom, X, host_sizes[:, 1]))
    heights, widths = y1 - y0, x1 - x0
    wide = flat.numel() >= 2**31  # int32 indices while they reach every byte
    for group in _groups(np.argsort(heights * widths, kind="stable"), heights, widths,
                         channels, budget):  # fmt: skip
        k = len(group)
        hc, wc = max(1, int(heights[group].max())), max(1, int(widths[group].max()))
        host = geom[group]
        oh, ow = int(host[0, Y + 4]), int(host[0, X + 4])
        # one host->device copy for the group's numbers: geometry, sizes, first row and
        # column read, and where each region starts in `flat`
        base = starts[group] + y0[group] * sizes[group, 1] + x0[group]
        ints = np.stack([sizes[group, 1], planes[group], heights[group], widths[group], base], 1)
        packed = torch.cat(
            [
                host,
                host_sizes[group],
                torch.from_numpy(np.stack([y0[group], x0[group]], 1)).double(),
                torch.from_numpy(ints).double(),
            ],
            1,
        )
        g, s, first, i = _to(packed, device).split([GEOMETRY, 2, 2, 5], 1)
        canvas = flat.index_select(0, _canvas_index(i, hc, wc, channels, len(flat) - 1, wide))
        canvas = canvas.view(k, hc * channels, wc).float()
        wy = axis_weights(g, Y, s[:, 0], first[:, 0], hc, oh, max_taps(host, Y))
        wx = axis_weights(g, X, s[:, 1], first[:, 1], wc, ow, max_taps(host, X))
        wx = torch.where(g[:, FLIP, None, None] > 0, wx.flip(1), wx)
        rows = torch.bmm(canvas, wx.transpose(1, 2))  # (k, hc * C, ow)
        res = torch.bmm(wy, rows.view(k, hc, channels * ow))  # (k, oh, C * ow)
        # the CPU path hands uint8 pixels over: round and clamp the same way
        res = res.round_().clamp_(0, 255).view(k, oh, channels, ow).permute(0, 2, 1, 3)
        index = _to(torch.from_numpy(np.asarray(group, dtype=np.int64)), device)
        if inv_std is None:
            out.index_copy_(0, index, res.to(out.dtype))
        else:
            out.index_copy_(0, index, torch.addcmul(bias, res, inv_std).to(out.dtype))


def _canvas_index(i: torch.Tensor, hc: int, wc: int, c: int, zero: int, wide: bool):
    """Index into `flat` of every canvas element, laid out (k, hc, C, wc): each image's
    region row by row, channel planes interleaved by row; `zero` past the region."""
    dtype = torch.int64 if wide else torch.int32
    width, plane, height, length, base = (t.to(dtype).view(-1, 1, 1, 1) for t in i.unbind(1))
    y = torch.arange(hc, device=i.device, dtype=dtype).view(1, hc, 1, 1)
    ch = torch.arange(c, device=i.device, dtype=dtype).view(1, 1, c, 1)
    x = torch.arange(wc, device=i.device, dtype=dtype).view(1, 1, 1, wc)
    index = base + y * width + ch * plane + x
    return torch.where((y < height) & (x < length), index, zero).view(-1)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # from pinned memory the copy does not stall the host
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _groups(order, heights, widths, channels: int, budget: int) -> list[list[int]]:
    """Sub-batches in ascending region area whose padded canvas fits the budget."""
    groups: list[list[int]] = []
    group: list[int] = []
    hmax = wmax = 0
    hs, ws = heights.tolist(), widths.tolist()  # plain ints: no NumPy scalar per step
    for i in order.tolist():
        h, w = max(hmax, hs[i]), max(wmax, ws[i])
        if group and (len(group) + 1) * channels * h * w > budget:
            groups.append(group)
            group, h, w = [], hs[i], ws[i]
        group.append(i)
        hmax, wmax = h, w
    if group:
        groups.append(group)
    return groups
